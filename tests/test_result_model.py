"""The message contract: every shipped schema generated from its model, outcomes, strict JSON,
older payloads upgraded by one chain of steps, one vocabulary, one identifier rule."""

from __future__ import annotations

import json
import math
import re
import threading
from pathlib import Path
from typing import Any, get_args

import pytest
from broker_support import FakeScanner
from pydantic import ValidationError

from deploy.appliance.base import ScanRequest
from deploy.appliance.results import Identity, ResultMessage, build_result, rfc3339
from deploy.collector.outcome import check_result
from deploy.exceptions import SchemaError
from deploy.messages import catalog, migrations, vocabulary
from deploy.messages.identifiers import (
    safe_join,
    validate_device_id,
)
from deploy.messages.receipt import ReceiptMessage
from deploy.messages.result import parse_result
from deploy.messages.testing import result_json
from deploy.schemas import SCHEMA_NAMES, load_schema, validate
from inference.result import (
    AbstainReason,
    Outcome,
    SlideReport,
    Stage,
    cancelled,
    failed,
    no_usable_field,
    strict_json,
)


def test_every_shipped_schema_is_the_one_generated_from_its_model() -> None:
    # Regenerate with: python -m deploy.messages --write
    assert set(catalog.SCHEMA_NAMES) == set(SCHEMA_NAMES)
    assert catalog.drifted() == []
    schema = load_schema("result")
    assert {"outcome", "prediction", "model", "message_id", "schema"} <= set(schema["required"])
    for name in ("status", "metrics", "reply", "ota_state", "receipt"):
        assert "schema" in load_schema(name)["required"], name


def test_the_dashboard_vocabulary_is_the_servers() -> None:
    # deploy/dashboard/vocabulary.js is generated too (python -m deploy.messages --write).
    path = vocabulary.DASHBOARD_VOCABULARY
    assert path.read_text("utf-8") == vocabulary.render_vocabulary()
    html = (path.parent / "index.html").read_text("utf-8")
    assert html.index('src="vocabulary.js"') < html.index('src="common.js"')
    select = html[html.index('name="outcome"') :]
    select = select[: select.index("</select>")]
    options = re.findall(r"<option>([a-z_]+)</option>", select)
    assert options == list(vocabulary.OUTCOMES)
    assert vocabulary.vocabulary()["outcomes"] == [o.value for o in Outcome]
    assert get_args(vocabulary.OutcomeName) == vocabulary.OUTCOMES
    assert "insufficient_fields" in vocabulary.vocabulary()["abstain_reasons"]


def test_a_drifted_schema_is_noticed(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    for name in catalog.SCHEMA_NAMES:
        (tmp_path / f"{name}.json").write_text(catalog.render(name), "utf-8")
    monkeypatch.setattr(catalog, "SCHEMA_DIR", tmp_path)
    assert catalog.drifted() == []
    status = json.loads((tmp_path / "status.json").read_text())
    status["properties"]["state"] = {"type": "string"}  # a hand edit
    (tmp_path / "status.json").write_text(json.dumps(status, indent=2) + "\n")
    assert catalog.drifted() == ["status"]


def message(report: SlideReport) -> ResultMessage:
    return build_result(
        Identity("d1", "b1"),
        seq=1,
        request=ScanRequest("S-1", 1),
        started_at=rfc3339(),
        finished_at=rfc3339(),
        report=report,
    )


def classified() -> SlideReport:
    return FakeScanner().scan(ScanRequest("S-1", 1), threading.Event())


MODEL = {"name": "m", "version": 1, "sha256": "a" * 64}


@pytest.mark.parametrize(
    "report",
    [
        classified(),
        no_usable_field(MODEL, {"name": "onnxruntime"}, "wdiff", [], {"total": 2.0}),
        failed(Stage.INFER, "probabilities are not finite", model=MODEL),
        cancelled("cancelled by cmd/cancel"),
    ],
    ids=["classified", "abstained", "failed", "cancelled"],
)
def test_every_outcome_round_trips_through_schema_and_model(report: SlideReport) -> None:
    msg = message(report)
    data = json.loads(msg.payload())
    validate("result", data)
    assert ResultMessage.model_validate(data) == msg
    assert data["outcome"] == report.outcome.value
    # omis.result/1 consumers read prediction.abstained: only a classified slide is decided.
    assert data["prediction"]["abstained"] is (report.outcome is not Outcome.CLASSIFIED)


def test_an_abstained_slide_names_a_documented_reason() -> None:
    base = classified().model_dump()
    base["prediction"].update(abstained=True, label=None, risk=None, side="high")
    with pytest.raises(ValidationError, match="abstained needs a reason"):
        SlideReport.model_validate({**base, "outcome": "abstained", "reason": "felt like it"})
    ok = SlideReport.model_validate(
        {**base, "outcome": "abstained", "reason": AbstainReason.UNCERTAIN_PROBABILITY.value}
    )
    assert ok.prediction.side == "high"  # where it leans, never a label
    leaning_label = dict(base["prediction"], label="high", risk="high")
    with pytest.raises(ValidationError, match="no label and no risk"):
        SlideReport.model_validate(
            {**base, "prediction": leaning_label, "outcome": "abstained", "reason": "out_of_range"}
        )


def test_inconsistent_outcomes_are_refused() -> None:
    data = failed(Stage.QC, "x").model_dump()
    with pytest.raises(ValidationError, match="stage"):
        SlideReport.model_validate({**data, "stage": None})
    undecided = dict(classified().prediction.model_dump(), abstained=True, label=None, risk=None)
    with pytest.raises(ValidationError, match="abstained must be False"):
        SlideReport.model_validate({**classified().model_dump(), "prediction": undecided})


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_numbers_never_reach_a_payload(bad: float) -> None:
    data: dict[str, Any] = classified().model_dump()
    data["prediction"]["probabilities"] = {"low": bad, "high": 0.5}
    with pytest.raises(ValidationError):
        SlideReport.model_validate(data)
    data = classified().model_dump()
    data["spectrum"]["values"] = [0.1, bad]
    with pytest.raises(ValidationError):
        SlideReport.model_validate(data)
    with pytest.raises(ValueError):
        strict_json({"x": bad})
    good = message(classified()).to_json()
    with pytest.raises(SchemaError, match="non-finite"):
        validate("result", dict(good, timings_ms={"total": bad}))


def _format2(**kw: Any) -> dict[str, Any]:
    """A result as app versions before format 3 wrote it: the arg-max in ``label``."""
    data = result_json(1, **kw)
    data.pop("format")
    prediction = data["prediction"]
    probs = prediction["probabilities"]
    argmax = max(probs, key=lambda c: probs[c])
    for key in ("argmax_label", "decision", "side", "band"):
        prediction.pop(key, None)
    if data["outcome"] == "abstained" and probs:
        prediction["risk"] = "high" if prediction["p_high"] >= 0.5 else "low"
    if probs:
        prediction["label"] = argmax
    for key in ("reason_text", "details"):
        data.pop(key, None)
    for field in data["fields"]:
        field.pop("checks", None)
    return data


def _format1(**kw: Any) -> dict[str, Any]:
    """Older still: no ``outcome``; the prediction says whether and why it abstained."""
    data = _format2(**kw)
    outcome, reason = data.pop("outcome"), data.pop("reason", None)
    data.pop("source")
    if outcome == "abstained":
        data["prediction"]["reason"] = reason
    return data


def test_results_of_earlier_formats_are_upgraded_before_validation() -> None:
    # Decision 0.2, p 0.3: format 2 wrote label "low" (the arg-max) beside risk "high".
    old = _format2(p_high=0.3, decision=0.2)
    assert (old["prediction"]["label"], old["prediction"]["risk"]) == ("low", "high")
    with pytest.raises(ValidationError):
        ResultMessage.model_validate(old)  # not the current format as such
    new = parse_result(old)
    assert new.format == migrations.CURRENT_FORMAT
    assert (new.prediction.label, new.prediction.risk) == ("high", "high")
    assert new.prediction.argmax_label == "low"
    stored = check_result(old)  # the archive's own entry point does the same
    assert stored["prediction"]["label"] == "high"
    validate("result", stored)
    leaning = parse_result(_format2(p_high=0.6, abstained=True))
    assert (leaning.prediction.label, leaning.prediction.side) == (None, "high")


def test_the_oldest_format_goes_through_every_step() -> None:
    calls: list[int] = []
    steps = tuple(
        (version, lambda d, v=version, s=step: (calls.append(v), s(d))[1])
        for version, step in migrations.MIGRATIONS
    )
    old = _format1(p_high=0.6, abstained=True)
    assert migrations.format_of(old) == 1
    original = json.dumps(old, sort_keys=True)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(migrations, "MIGRATIONS", steps)
        upgraded = migrations.upgrade_result(old)
    assert calls == [1, 2]
    assert json.dumps(old, sort_keys=True) == original  # the input is left as received
    message = ResultMessage.model_validate(upgraded)
    assert (message.outcome, message.reason) == (Outcome.ABSTAINED, "uncertain_probability")
    assert message.prediction.side == "high"
    assert parse_result(_format1(p_high=0.9)).prediction.label == "high"
    with pytest.raises(ValueError, match="format"):
        migrations.upgrade_result({**result_json(1), "format": 99})


@pytest.mark.parametrize("device", ["lab.scope-1", "a", "A_b-c.d", "9" * 64])
def test_one_identifier_rule_for_device_and_archive(device: str) -> None:
    assert validate_device_id(device) == device
    assert safe_join(Path("/base"), device, ".tar") == Path(f"/base/{device}.tar")
    data = result_json(1, device=device, slide=device)
    validate("result", data)
    assert check_result(data)["device_id"] == device


@pytest.mark.parametrize(
    "bad", ["", ".hidden", "..", "a/b", "a\x00b", "x" * 65, "a b", "A1\n", "-x", None, 7]
)
def test_ids_outside_the_rule_are_refused_everywhere(bad: Any) -> None:
    with pytest.raises(ValueError, match="not a valid id"):
        validate_device_id(bad)
    with pytest.raises(ValueError):
        safe_join(Path("/base"), bad)
    data = result_json(1)
    data["device_id"] = bad
    with pytest.raises(ValueError, match="device_id"):
        check_result(data)


@pytest.mark.parametrize(
    ("where", "value"),
    [
        ("seq", 2**63),
        ("boot_id", "b\x00"),
        ("finished_at", "2026-02-30T00:00:00Z"),
        ("finished_at", "0001-01-01T00:00:00Z"),
        ("started_at", "9999-12-31T23:59:59Z"),
        ("model.version", "7"),
        ("model.version", "seven"),
        ("seq", "1"),
        ("model.version", 2**63),
        ("prediction.label", "x" * 65),
        ("prediction.label", {"a": 1}),
        ("prediction.p_high", float("1" * 401)),
        ("reason", "r\x00"),
    ],
)
def test_values_no_database_can_store_are_refused_by_the_model(where: str, value: Any) -> None:
    data = result_json(1, outcome="failed", stage="infer", reason="x")
    node = data
    *path, leaf = where.split(".")
    for key in path:
        node = node[key]
    node[leaf] = value
    with pytest.raises(ValueError, match=path[0] if path else leaf):
        check_result(data)


def test_the_receipt_names_what_the_archive_holds() -> None:
    ids = [result_json(i)["message_id"] for i in (1, 2)]
    receipt = ReceiptMessage(
        message_ids=ids,
        rejected=[{"message_id": result_json(3)["message_id"], "reason": "not a result"}],
        collector="collect-1",
        at=rfc3339(),
    )
    data = json.loads(receipt.payload())
    validate("receipt", data)
    assert data["schema"] == "omis.receipt/1" and data["message_ids"] == ids
    with pytest.raises(ValidationError, match="at least one"):
        ReceiptMessage(collector="c", at=rfc3339())
    with pytest.raises(SchemaError):
        validate("receipt", {**data, "message_ids": ["not-a-uuid"]})


def test_received_bytes_parse_to_typed_messages_or_one_line_errors() -> None:
    from deploy.messages.parsing import MessageError, parse_message

    good = result_json(1)
    parsed = parse_message("result", json.dumps(good).encode())
    assert isinstance(parsed, ResultMessage) and parsed.to_json() == good
    assert parse_message("status", b"") is None  # a cleared retained topic
    assert parse_message("availability", b"online") is not None
    deep = b"[" * 100_000 + b"]" * 100_000
    bad = {
        b"{not json": "not JSON",
        b"\xff\xfe": "UTF-8",
        deep: "deep",
        json.dumps({**good, "seq": 0}).encode(): "seq",
        b'{"p": NaN}': "NaN",
    }
    for payload, words in bad.items():
        with pytest.raises(MessageError, match=words) as caught:
            parse_message("result", payload)
        assert "\n" not in str(caught.value)
    with pytest.raises(MessageError, match="availability"):
        parse_message("availability", b"maybe")
