"""The one typed result model: shipped schema generated from it, outcomes, strict JSON."""

from __future__ import annotations

import json
import math
import threading
from typing import Any

import pytest
from broker_support import FakeScanner
from pydantic import ValidationError

from deploy.appliance.base import ScanRequest
from deploy.appliance.results import (
    SCHEMA_FILE,
    Identity,
    ResultMessage,
    build_result,
    render_schema,
    rfc3339,
)
from deploy.exceptions import SchemaError
from deploy.schemas import load_schema, validate
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


def test_the_shipped_schema_is_the_one_generated_from_the_model() -> None:
    # Regenerate with: python -m deploy.appliance.results --write
    assert SCHEMA_FILE.read_text("utf-8") == render_schema()
    schema = load_schema("result")
    assert {"outcome", "prediction", "model", "message_id"} <= set(schema["required"])


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
    base["prediction"]["abstained"] = True
    with pytest.raises(ValidationError, match="abstained needs a reason"):
        SlideReport.model_validate({**base, "outcome": "abstained", "reason": "felt like it"})
    ok = SlideReport.model_validate(
        {**base, "outcome": "abstained", "reason": AbstainReason.UNCERTAIN_PROBABILITY.value}
    )
    assert ok.prediction.label is not None  # the leaning label stays visible


def test_inconsistent_outcomes_are_refused() -> None:
    data = failed(Stage.QC, "x").model_dump()
    with pytest.raises(ValidationError, match="stage"):
        SlideReport.model_validate({**data, "stage": None})
    with pytest.raises(ValidationError, match="abstained must be False"):
        SlideReport.model_validate({**classified().model_dump(), "prediction": dict(
            classified().prediction.model_dump(), abstained=True)})  # fmt: skip


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
