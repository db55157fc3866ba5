"""The seam between device and archive: one id rule, one call, reasons with values, namespaces.

Each test drives the device's real code (pipeline on a real ONNX bundle, the appliance's result
builder) into the archive's real code (ingest callback, store on SQLite, HTTP API, FHIR).
"""

from __future__ import annotations

import csv
import io
import json
import math
import threading
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import paho.mqtt.client as paho
import pytest
from broker_support import (
    FakeScanner,
    Mosquitto,
    app_config,
    mosquitto_fixture,  # noqa: F401
    running_appliance,
    wait_until,
)
from fakes.bundles import make_bundle, make_field
from fastapi.testclient import TestClient

from deploy.appliance.base import ScanRequest
from deploy.appliance.results import Identity, build_result, rfc3339
from deploy.appliance.service import Appliance
from deploy.appliance.worker import verdict_of
from deploy.broker import free_port
from deploy.cli import main
from deploy.collector.api import create_app
from deploy.collector.auth import hash_password
from deploy.collector.config import Account, CollectorMqtt, HttpConfig, load_collector_config
from deploy.collector.db import migrate, open_engine
from deploy.collector.ingest import ArchiveSubscriber
from deploy.collector.queries import ArchiveQueries
from deploy.collector.service import ArchiveService
from deploy.collector.store import ArchiveStore
from deploy.config import load_config
from deploy.messages.testing import result_json, result_message
from deploy.schemas import validate
from inference.backends import load_backend
from inference.pipeline import PipelineConfig, SlidePipeline
from inference.result import SlideReport

PASSWORD = "correct horse"
PREFIX = "omis/v1"


def _logits(p_high: float) -> tuple[float, float]:
    """Constant logits whose softmax gives p(high) = ``p_high``."""
    return 0.0, math.log(p_high / (1.0 - p_high))


def _report(tmp_path: Path, p_high: float, fields: list[Any] | None = None, **kw: Any) -> Any:
    minimum = {k: kw.pop(k) for k in ("min_usable_fields",) if k in kw}
    bundle = make_bundle(tmp_path / "bundle", logits=_logits(p_high), **kw)
    config = PipelineConfig(spectrum_backend="numpy", **minimum)
    with load_backend("onnxruntime", bundle) as backend:
        result = SlidePipeline(bundle, backend, config).run_slide(fields or [make_field(0)])
    return result.report()


def _payload(report: SlideReport, device: str = "scope-07", slide: str = "S-1") -> bytes:
    """The bytes the device publishes for ``report`` (its own builder and serialiser)."""
    msg = build_result(
        Identity(device, "boot-1"),
        seq=1,
        request=ScanRequest(slide, 1, source="mqtt"),
        started_at=rfc3339(),
        finished_at=rfc3339(),
        report=report,
    )
    return msg.payload()


class _Client:
    """The two calls the ingest writer makes on paho's client: acknowledge, send receipts."""

    def __init__(self) -> None:
        self.acked: list[int] = []
        self.published: list[tuple[str, bytes]] = []

    def ack(self, mid: int, qos: int) -> None:
        self.acked.append(mid)

    def publish(self, topic: str, payload: bytes, qos: int = 0, retain: bool = False) -> None:
        self.published.append((topic, payload))


def _deliver(subscriber: ArchiveSubscriber, device: str, payload: bytes) -> _Client:
    """Hand one result to the archive's MQTT callback as paho would, then let the writer
    store, acknowledge and confirm it (the batched writer's one step, on this thread)."""
    msg = paho.MQTTMessage(mid=7, topic=f"{PREFIX}/{device}/result".encode())
    msg.payload, msg.qos = payload, 1
    client = _Client()
    subscriber._client = client  # type: ignore[assignment]
    subscriber._on_message(client, None, msg)  # type: ignore[arg-type]
    queued = subscriber._inbox.get_nowait()
    assert queued is not None
    subscriber._handle([queued])
    return client


@pytest.fixture
def archive(tmp_path: Path) -> Any:
    engine = open_engine(f"sqlite:///{tmp_path / 'archive.sqlite'}")
    migrate(engine)
    store = ArchiveStore(engine)
    subscriber = ArchiveSubscriber(CollectorMqtt(broker="mqtt://127.0.0.1:1883"), store)
    config = HttpConfig(
        accounts=[Account(name="lab", role="viewer", password_hash=hash_password(PASSWORD))]
    )
    api = TestClient(create_app(ArchiveQueries(engine), config, None), base_url="http://localhost")
    api.auth = ("lab", PASSWORD)
    yield subscriber, api
    engine.dispose()


@pytest.mark.parametrize("device", ["lab.scope-1", "a", "Scope_7.b-c", "x" * 64, "1.2.3"])
def test_every_device_id_the_device_accepts_is_archived(
    tmp_path: Path, archive: Any, device: str
) -> None:
    # The device accepts these ids (its config and result model); the archive must store them.
    assert load_config(None, environ={"OMIS_DEVICE__ID": device}).device.id == device
    subscriber, api = archive
    client = _deliver(subscriber, device, _payload(_classified_report(tmp_path), device=device))
    assert client.acked == [7]
    items = api.get("/api/results").json()["items"]
    assert [i["device_id"] for i in items] == [device], "acknowledged but not archived"
    assert [d["device_id"] for d in api.get("/api/devices").json()] == [device]


_CACHE: dict[str, SlideReport] = {}


def _classified_report(tmp_path: Path) -> SlideReport:
    if "r" not in _CACHE:
        _CACHE["r"] = _report(tmp_path, 0.9)
    return _CACHE["r"]


# (decision, abstain band, p(high), the decision's call, the arg-max): the call and the arg-max
# disagree in both, so a product that shows the arg-max anywhere fails.
ONE_CALL = [
    (0.2, (0.15, 0.25), 0.30, "high", "low"),
    (0.99, (0.985, 0.995), 0.96, "low", "high"),
]


@pytest.mark.parametrize(("decision", "band", "p_high", "call", "argmax"), ONE_CALL)
def test_label_risk_and_decision_agree_everywhere(
    tmp_path: Path,
    archive: Any,
    decision: float,
    band: tuple[float, float],
    p_high: float,
    call: str,
    argmax: str,
) -> None:
    thresholds = {"decision": decision, "abstain_low": band[0], "abstain_high": band[1]}
    report = _report(tmp_path, p_high, thresholds=thresholds)
    payload = _payload(report)
    result = json.loads(payload)
    validate("result", result)
    prediction = result["prediction"]
    assert result["outcome"] == "classified"
    assert prediction["p_high"] == pytest.approx(p_high, abs=1e-5)
    assert (prediction["label"], prediction["risk"]) == (call, call)
    assert prediction["argmax_label"] == argmax
    assert prediction["decision"] == decision

    subscriber, api = archive
    assert _deliver(subscriber, "scope-07", payload).acked == [7]
    [item] = api.get("/api/results").json()["items"]
    assert (item["label"], item["risk"]) == (call, call)
    assert api.get("/api/results", params={"risk": call}).json()["total"] == 1
    rows = list(csv.DictReader(io.StringIO(api.get("/api/results.csv").text)))
    assert [(r["label"], r["risk"]) for r in rows] == [(call, call)]
    fhir = api.get(f"/api/results/{result['message_id']}/fhir").json()
    report_fhir = next(
        e["resource"] for e in fhir["entry"] if e["resource"]["resourceType"] == "DiagnosticReport"
    )
    # the unsigned report says what it is first (review), then the device's call (contract)
    assert f"Device triage: {call} risk" in report_fhir["conclusion"]
    other = "low" if call == "high" else "high"
    assert f"{other} risk" not in json.dumps(fhir)
    alerts = [a for a in api.get("/api/alerts").json() if a["kind"] == "high_risk"]
    assert len(alerts) == (1 if call == "high" else 0)


def test_pap4_label_is_the_class_the_decision_picks(tmp_path: Path) -> None:
    # p(IV)+p(V) = 0.35 >= decision 0.3, though III alone is the most probable class: the call
    # is high, and the label is the most probable class on the high side.
    probs = np.array([0.05, 0.60, 0.20, 0.15])
    bundle_kw = {
        "classes": ("II", "III", "IV", "V"),
        "risk": {"II": "low", "III": "low", "IV": "high", "V": "high"},
        "logits": tuple(np.log(probs)),
        "thresholds": {"decision": 0.3, "abstain_low": 0.25, "abstain_high": 0.3},
    }
    bundle = make_bundle(tmp_path / "b", **bundle_kw)
    with load_backend("onnxruntime", bundle) as backend:
        pipe = SlidePipeline(bundle, backend, PipelineConfig(spectrum_backend="numpy"))
        prediction = pipe.run_slide([make_field(0)]).report().prediction
    assert (prediction.label, prediction.risk, prediction.argmax_label) == ("IV", "high", "III")


def test_an_abstained_slide_states_side_band_p_and_the_limit(tmp_path: Path) -> None:
    thresholds = {"decision": 0.2, "abstain_low": 0.1, "abstain_high": 0.5}
    report = _report(tmp_path, 0.4, thresholds=thresholds)
    data = json.loads(_payload(report))
    prediction = data["prediction"]
    assert (data["outcome"], data["reason"]) == ("abstained", "uncertain_probability")
    # p 0.4 is above the decision threshold 0.2: it leans high, though p < 0.5.
    assert (prediction["label"], prediction["risk"], prediction["side"]) == (None, None, "high")
    assert prediction["band"] == [0.1, 0.5]
    assert prediction["p_high"] == pytest.approx(0.4, abs=1e-5)
    [detail] = data["details"]
    assert (detail["measure"], detail["op"], detail["limit"]) == ("p_high", "in", [0.1, 0.5])
    assert detail["value"] == pytest.approx(0.4, abs=1e-5)
    assert "0.4" in data["reason_text"] and "[0.1, 0.5]" in data["reason_text"]


def test_out_of_range_states_the_mass_and_its_limit(tmp_path: Path) -> None:
    report = _report(
        tmp_path, 0.98, render={"x_range_nm": [-10.0, 10.0]}, thresholds={"out_of_range": 0.05}
    )
    data = json.loads(_payload(report))
    assert data["reason"] == "out_of_range"
    [detail] = data["details"]
    assert (detail["measure"], detail["op"], detail["limit"]) == ("mass_outside_window", ">", 0.05)
    assert detail["value"] == pytest.approx(data["spectrum"]["mass_outside_window"])
    assert detail["value"] > 0.05
    assert "mass_outside_window" in data["reason_text"]


DARK = (np.zeros((48, 48, 3), np.uint8), np.zeros((48, 48, 3), np.uint8))


def test_each_rejected_field_states_its_measure_and_threshold(tmp_path: Path) -> None:
    report = _report(tmp_path, 0.9, [make_field(0), DARK, make_field(1)])
    data = json.loads(_payload(report))
    dark = data["fields"][1]
    assert dark["quality"] == "reject"
    by_code = {c["code"]: c for c in dark["checks"]}
    assert set(by_code) == set(dark["reasons"])
    check = by_code["dark"]
    assert (check["measure"], check["op"], check["limit"]) == ("dark_fraction", ">", 0.5)
    assert check["value"] == 1.0
    assert data["fields"][0]["checks"] == []


@pytest.mark.parametrize(("minimum", "outcome"), [(2, "abstained"), (1, "classified")])
def test_too_few_usable_fields_is_abstained_with_counts(
    tmp_path: Path, minimum: int, outcome: str
) -> None:
    report = _report(tmp_path, 0.9, [make_field(0), DARK, DARK], min_usable_fields=minimum)
    data = json.loads(_payload(report))
    validate("result", data)
    assert data["outcome"] == outcome
    # Quality control, not the model, decided it: it does not count against a model on probation.
    assert verdict_of(report) == (None if outcome == "abstained" else "ok")
    if outcome == "abstained":
        assert data["reason"] == "insufficient_fields"
        [detail] = data["details"]
        assert (detail["measure"], detail["value"], detail["op"], detail["limit"]) == (
            "usable_fields",
            1,
            "<",
            2,
        )
        assert data["reason_text"].startswith("1 of 3 fields passed quality control")
        assert data["prediction"]["label"] is None


def test_min_usable_fields_is_configured_with_a_documented_default() -> None:
    assert load_config(None, environ={}).scan.min_usable_fields == 2
    config = load_config(None, environ={"OMIS_SCAN__MIN_USABLE_FIELDS": "3"})
    assert config.scan.min_usable_fields == 3
    doc = (Path(__file__).resolve().parents[1] / "docs" / "configuration.md").read_text()
    assert "min_usable_fields" in doc


def test_the_collectors_variables_do_not_stop_the_appliance(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for var, value in {
        "OMIS_COLLECT_DATABASE__URL": "postgresql://omis@db/omis",
        "OMIS_COLLECT_MQTT__BROKER": "mqtt://broker:1883",
        "OMIS_COLLECT_HTTP__LISTEN": "0.0.0.0:8080",
        "OMIS_COLLECT_DATABASE__PASSWORD_FILE": str(tmp_path / "pw"),
        "OMIS_COLLECT_HIGH_RISK_ALERTS": "false",
    }.items():
        monkeypatch.setenv(var, value)
    monkeypatch.setenv("OMIS_STATE_DIR", str(tmp_path / "state"))
    assert main(["serve", "--validate-config"]) == 0, capsys.readouterr().err
    assert capsys.readouterr().out.strip() == "OK"
    # The appliance still reads (and checks) its own namespace.
    monkeypatch.setenv("OMIS_SCAN__QUEUE_SIZE", "-1")
    assert main(["serve", "--validate-config"]) == 1
    assert "scan.queue_size" in capsys.readouterr().err


def test_a_result_of_the_previous_format_is_archived_with_the_decision(archive: Any) -> None:
    # An app version before format 3 wrote the arg-max as label: decision 0.2, p 0.3 -> "low".
    subscriber, api = archive
    old = result_json(1, p_high=0.3, decision=0.2)
    old.pop("format")
    old["prediction"] = {
        k: v for k, v in old["prediction"].items() if k not in ("argmax_label", "decision", "band")
    }
    old["prediction"]["label"] = "low"
    assert _deliver(subscriber, "scope-07", json.dumps(old).encode()).acked == [7]
    [item] = api.get("/api/results").json()["items"]
    assert (item["label"], item["risk"]) == ("high", "high")
    stored = api.get(f"/api/results/{old['message_id']}").json()["result"]
    assert (stored["format"], stored["prediction"]["argmax_label"]) == (3, "low")


@pytest.mark.parametrize(
    ("outcome", "reason", "stage"),
    [
        ("classified", None, None),
        ("abstained", "uncertain_probability", None),
        ("abstained", "no_usable_field", None),
        ("failed", "camera timed out", "acquire"),
        ("cancelled", "cancelled by cmd/cancel", None),
    ],
)
def test_every_outcome_goes_from_the_devices_bytes_into_the_archive(
    archive: Any, outcome: str, reason: str | None, stage: str | None
) -> None:
    subscriber, api = archive
    message = result_message(1, device="lab.scope-1", outcome=outcome, reason=reason, stage=stage)
    assert _deliver(subscriber, "lab.scope-1", message.payload()).acked == [7]
    [item] = api.get("/api/results").json()["items"]
    assert (item["outcome"], item["outcome_reason"]) == (outcome, message.reason)
    assert item["review"] is (outcome != "classified")
    stored = api.get(f"/api/results/{message.message_id}").json()["result"]
    assert stored == message.to_json()


def test_a_dotted_device_id_travels_through_a_real_broker_into_the_archive(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    # The user's story: `omis scan --device-id lab.scope-1` against a running `omis collect`.
    config = load_collector_config(
        environ={},
        overrides={
            "mqtt": {"broker": mosquitto.url, "client_id": "archive-dots"},
            "http": {"port": free_port()},
        },
    )
    service = ArchiveService(config, tmp_path / "archive")
    stop = threading.Event()
    service.start()
    runner = threading.Thread(target=service.run, args=(stop,))
    runner.start()
    try:
        assert service.subscriber is not None
        assert service.subscriber.subscribed.wait(20)
        device = Appliance(
            load_config(environ={}, overrides=app_config(mosquitto.url, device="lab.scope-1")),
            tmp_path / "device",
            FakeScanner(),
        )
        with running_appliance(device) as app:
            for slide in ("lab.S-1", "lab.S-2"):
                app.submit(ScanRequest(slide, 2))
            api = httpx.Client(base_url=service.http_url, timeout=10)
            assert wait_until(lambda: api.get("/api/results").json()["total"] == 2, 30)
        items = api.get("/api/results").json()["items"]
        assert {(i["device_id"], i["slide_id"]) for i in items} == {
            ("lab.scope-1", "lab.S-1"),
            ("lab.scope-1", "lab.S-2"),
        }
        assert wait_until(
            lambda: [d["device_id"] for d in api.get("/api/devices").json()] == ["lab.scope-1"], 10
        )
    finally:
        stop.set()
        runner.join(10)
        service.close()


@pytest.mark.parametrize(
    ("body", "fields"),
    [
        ({"slide_id": "S-9"}, 2),
        ({"slide_id": "S-9", "fields": None}, 2),
        ({"slide_id": "S-9", "fields": 5}, 5),
    ],
)
def test_cmd_scan_is_parsed_with_its_model(
    tmp_path: Path, body: dict[str, Any], fields: int
) -> None:
    # The intake hands the handler the typed command; an absent or null "fields" is the default.
    app = Appliance(
        load_config(environ={}, overrides={"scan": {"fields": 2}}), tmp_path, FakeScanner()
    )
    reply = app.intake.router.handle("scan", json.dumps(body).encode(), None)
    assert reply is not None and reply["ok"], reply
    validate("reply", reply)
    queued = app.queue.get(1.0)
    assert queued is not None and (queued.slide_id, queued.fields) == ("S-9", fields)
