"""The scan worker against an in-memory publisher: one outcome per scan, whatever happens."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest
from broker_support import FakeScanner

from deploy.appliance import worker as worker_module
from deploy.appliance.base import ScanRequest
from deploy.appliance.publisher import MemoryPublisher
from deploy.appliance.queue import ScanQueue
from deploy.appliance.results import Identity, ResultMessage
from deploy.appliance.worker import ScanPorts, ScanWorker
from deploy.schemas import validate
from firmware_bridge.exceptions import BridgeOperationError
from inference.exceptions import EngineError, GoldenMismatchError, SpectrumInputError


class Health:
    def __init__(self) -> None:
        self.finished: list[tuple[int, str, str]] = []

    def started(self) -> int:
        return 7

    def done(self, token: int, verdict: str, why: str) -> None:
        self.finished.append((token, verdict, why))


def make_worker(
    scanner: Any, capacity: int = 4
) -> tuple[ScanWorker, MemoryPublisher, Health, list[tuple[str, str]]]:
    publisher, health, errors = MemoryPublisher(), Health(), []
    info = FakeScanner().open()
    ports = ScanPorts(
        publisher=publisher,
        has_room=lambda: True,
        slide_started=health.started,
        slide_finished=health.done,
        status_changed=lambda: None,
        record_error=lambda code, msg: errors.append((code, msg)),
        info=lambda: info,
        model_seen=lambda model: None,
    )
    worker = ScanWorker(Identity("d1", "boot"), scanner, ScanQueue(capacity), ports)
    return worker, publisher, health, errors


def payloads(publisher: MemoryPublisher) -> list[dict[str, Any]]:
    out = []
    for result in publisher.results:
        data = result.to_json()
        validate("result", data)
        assert ResultMessage.model_validate(data) == result  # the schema and model agree
        out.append(data)
    return out


def test_a_classified_slide_is_one_result_with_its_outcome() -> None:
    worker, publisher, health, _ = make_worker(FakeScanner())
    worker.scan_one(ScanRequest("S-1", 2))
    (result,) = payloads(publisher)
    assert result["outcome"] == "classified" and result["seq"] == 1
    assert result["prediction"]["abstained"] is False and result["prediction"]["label"]
    assert "reason" not in result and "stage" not in result
    assert [v for _, v, _ in health.finished] == ["ok"]


class Failing(FakeScanner):
    def __init__(self, error: BaseException) -> None:
        super().__init__()
        self.error = error

    def scan(self, request: ScanRequest, cancel: threading.Event) -> Any:
        raise self.error


@pytest.mark.parametrize(
    ("error", "stage", "verdict"),
    [
        (BridgeOperationError("stage jammed"), "acquire", "hardware"),
        (SpectrumInputError("field 0: shapes differ"), "spectrum", "failed"),
        (EngineError("engine produced NaN"), "infer", "failed"),
        (GoldenMismatchError("golden outputs differ"), "model", "failed"),
        (worker_module.ScanRejectedError("boom", "x"), "internal", "failed"),
        (RuntimeError("a defect"), "internal", "failed"),
    ],
)
def test_a_failed_slide_is_published_with_stage_and_reason(
    error: BaseException, stage: str, verdict: str
) -> None:
    worker, publisher, health, errors = make_worker(Failing(error))
    worker.scan_one(ScanRequest("S-2", 1))
    (result,) = payloads(publisher)
    assert result["outcome"] == "failed" and result["stage"] == stage
    assert str(error) in result["reason"]
    assert result["prediction"] == {
        "label": None,
        "probabilities": {},
        "risk": None,
        "abstained": True,
    }
    assert result["model"]["name"] == "fake"  # names the model that was serving
    assert errors and errors[0][0] == "scan_failed"
    assert worker.counters.scans_failed == 1
    # The health period of an update judges the model by it: acquisition is the hardware's.
    ((token, judged, why),) = health.finished
    assert (token, judged) == (7, verdict) and why.startswith("slide S-2: ") and str(error) in why


def test_cancelled_running_and_dropped_queued_scans_are_published() -> None:
    worker, publisher, _, _ = make_worker(FakeScanner(delay_s=0.2), capacity=4)
    stop = threading.Event()
    thread = threading.Thread(target=worker.run, args=(stop,), daemon=True)
    first, second = ScanRequest("LONG", 50), ScanRequest("WAITING", 1)
    worker.submit(first)
    worker.submit(second)
    thread.start()
    deadline = time.monotonic() + 5
    while worker.queue.current is None and time.monotonic() < deadline:
        time.sleep(0.01)
    worker.finish(grace_s=0.1)  # WAITING is dropped, LONG is cancelled between fields
    stop.set()
    thread.join(5)
    results = {r["slide_id"]: r for r in payloads(publisher)}
    assert set(results) == {"LONG", "WAITING"}
    assert {r["outcome"] for r in results.values()} == {"cancelled"}
    assert all(r["reason"] and r["prediction"]["label"] is None for r in results.values())
    assert [r["seq"] for r in payloads(publisher)] == [1, 2]


def test_committed_results_are_bounded_in_a_long_running_daemon(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    worker, _, _, _ = make_worker(FakeScanner(fail_slides=frozenset({"s0", "s1"})))
    worker.committed = type(worker.committed)(maxlen=5)
    requests = [ScanRequest(f"s{i}", 1) for i in range(12)]
    for request in requests:
        worker.scan_one(request)
    assert [c.scan_id for c in worker.committed] == [r.scan_id for r in requests[-5:]]
    assert worker.counters.scans_failed == 2 and worker.counters.scans_ok == 10


def test_the_health_period_judges_the_model() -> None:
    """Failures after acquisition roll back; a referral rate significantly above the validated
    one rolls back; a hardware fault neither commits nor fails: the period starts over and
    ota/state names it."""
    from deploy.appliance.health import HealthJudge, ValidatedRates
    from deploy.appliance.ota import OtaController, OtaPorts, OtaSettings
    from deploy.ota import HealthPolicy

    now = [0.0]
    published: list[bytes] = []

    def controller(referral: float = 0.05) -> OtaController:
        ports = OtaPorts(
            slide_lock=threading.Lock,
            publish=lambda topic, payload, retain: published.append(payload),
            set_updating=lambda updating: None,
            model_loaded=lambda info: None,
            connected=lambda: True,
            base_topic="omis/v1/d1",
            prefix="omis/v1",
            device_id="d1",
        )
        ctl = OtaController(Path("/nonexistent"), ports, None, OtaSettings(significance=0.01))
        ctl.monitor._clock = lambda: now[0]
        ctl.monitor.start(HealthPolicy(slides=3, seconds=10.0, check_interval_s=1.0))
        ctl.monitor.record_check(True)
        ctl._watch = 1  # a switched model is on probation
        ctl._judge = HealthJudge(ValidatedRates(referral, 0.05, True), qc_changed=False)
        return ctl

    ctl = controller()
    ctl.slide_finished(1, "ok")
    ctl.slide_finished(2, "failed", "another period")  # a slide of an older period: ignored
    assert ctl.monitor.verdict() == "pending"
    ctl.slide_finished(1, "failed", "slide S: spectrum: shapes differ")
    assert ctl.monitor.verdict() == "unhealthy"

    ctl = controller(referral=0.05)
    ctl.slide_finished(1, "abstained", "uncertain_probability")
    assert ctl.monitor.verdict() == "pending"  # p = 0.05: one referral proves nothing
    ctl.slide_finished(1, "abstained", "uncertain_probability")
    assert ctl.monitor.verdict() == "unhealthy"  # 2 of 2 at 5 %: p = 0.0025
    assert "referred on 2 of 2 slides" in (ctl.monitor.failure or "")

    ctl = controller(referral=0.4)  # a model validated to refer 40 %: 2 of 3 is expected
    ctl.slide_finished(1, "abstained", "uncertain_probability")
    ctl.slide_finished(1, "ok")
    ctl.slide_finished(1, "abstained", "uncertain_probability")
    assert ctl.monitor.verdict() == "healthy"

    ctl = controller()  # same QC as before: slides without a usable field say nothing
    for _ in range(3):
        ctl.slide_finished(1, "no_usable_field", "no_usable_field")
    assert ctl.monitor.verdict() == "pending"

    ctl = controller()
    ctl.slide_finished(1, "ok")
    ctl.slide_finished(1, "ok")
    now[0] = 9.0
    ctl.slide_finished(1, "hardware", "slide S: camera timeout")
    now[0] = 12.0  # past the 10 s of the period had it not started over
    assert ctl.monitor.verdict() == "pending"
    assert ctl.monitor.hardware_fault == "slide S: camera timeout"
    for _ in range(3):
        ctl.slide_finished(1, "ok")
    assert ctl.monitor.verdict() == "healthy"
