"""The scan worker against an in-memory publisher: one outcome per scan, whatever happens."""

from __future__ import annotations

import threading
import time
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
from inference.exceptions import SpectrumInputError


class Health:
    def __init__(self) -> None:
        self.finished: list[tuple[int, bool, str]] = []

    def started(self) -> int:
        return 7

    def done(self, token: int, ok: bool, why: str) -> None:
        self.finished.append((token, ok, why))


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
    assert health.finished == [(7, True, "")]


class Failing(FakeScanner):
    def __init__(self, error: BaseException) -> None:
        super().__init__()
        self.error = error

    def scan(self, request: ScanRequest, cancel: threading.Event) -> Any:
        raise self.error


@pytest.mark.parametrize(
    ("error", "stage", "counts_against_model"),
    [
        (BridgeOperationError("stage jammed"), "acquire", False),
        (SpectrumInputError("field 0: shapes differ"), "spectrum", False),
        (worker_module.ScanRejectedError("boom", "x"), "internal", True),
    ],
)
def test_a_failed_slide_is_published_with_stage_and_reason(
    error: BaseException, stage: str, counts_against_model: bool
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
    assert (health.finished == [(7, False, f"slide S-2: {error}")]) is counts_against_model


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
