"""Retained ``status``, ``ota/state`` and ``availability`` are read with the message models.

A payload the model refuses is a data error: set aside in ``GET /api/rejected`` with the reason,
acknowledged, and the device's stored state stays what it was.  A status as the previous app
version built it (before the ``shadow`` key) is stored in the current shape.
"""

from __future__ import annotations

import base64
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from broker_support import (
    Mosquitto,
    mosquitto_fixture,  # noqa: F401 - the "mosquitto" fixture
    publish,
    wait_until,
)

from deploy.broker import free_port
from deploy.collector.config import load_collector_config
from deploy.collector.service import ArchiveService
from deploy.messages.testing import ota_state_message, status_message

DEVICE = "scope-07"
PREFIX = f"omis/v1/{DEVICE}"


@pytest.fixture
def api(mosquitto: Mosquitto, tmp_path: Path) -> Iterator[httpx.Client]:
    """A running in-process archive (SQLite) and a client of its HTTP API."""
    config = load_collector_config(
        environ={},
        overrides={
            "mqtt": {"broker": mosquitto.url, "client_id": "archive-states"},
            "http": {"port": free_port()},
        },
    )
    service = ArchiveService(config, tmp_path / "state")
    stop = threading.Event()
    service.start()
    runner = threading.Thread(target=service.run, args=(stop,), daemon=True)
    runner.start()
    try:
        assert service.subscriber is not None and service.subscriber.subscribed.wait(10)
        with httpx.Client(base_url=service.http_url, timeout=10) as client:
            yield client
    finally:
        stop.set()
        runner.join(10)
        service.close()


def _device(api: httpx.Client) -> dict[str, Any]:
    found = [d for d in api.get("/api/devices").json() if d["device_id"] == DEVICE]
    return found[0] if found else {}


def _rejected(api: httpx.Client) -> list[dict[str, Any]]:
    return list(api.get("/api/rejected").json()["items"])


# Each violates the model while passing the old envelope check (schema and ``at`` present).
BAD_STATUS: dict[str, dict[str, Any]] = {
    "queue is not an object": {"queue": "full"},
    "unknown state": {"state": "sleeping"},
    "unknown key": {"colour": "red"},
    "another device's id": {"device_id": "scope-99"},
    "model version a word": {"model": {"name": "m", "version": "v", "sha256": "ab"}},
}


@pytest.mark.parametrize("leaf", ["status", "ota/state"])
def test_a_state_the_model_refuses_is_set_aside_and_the_stored_one_stays(
    mosquitto: Mosquitto, api: httpx.Client, leaf: str
) -> None:
    good: dict[str, Any] = (
        status_message("idle").to_json() if leaf == "status" else ota_state_message(3).to_json()
    )
    publish(mosquitto.port, f"{PREFIX}/{leaf}", json.dumps(good), retain=True)
    key = "status" if leaf == "status" else "ota_state"
    assert wait_until(lambda: _device(api).get(key) == good, 10), _device(api)
    if leaf == "status":
        bad = [{**good, **change} for change in BAD_STATUS.values()]
    else:
        bad = [{**good, "current": "three"}, {**good, "progress": 1}, {**good, "pending": -1}]
    for body in bad:
        publish(mosquitto.port, f"{PREFIX}/{leaf}", json.dumps(body), retain=True)
    assert wait_until(lambda: len(_rejected(api)) == len(bad), 10), _rejected(api)
    items = _rejected(api)
    for item in items:
        assert item["topic"] == f"{PREFIX}/{leaf}" and item["kind"] == "data"
        assert item["reason"].startswith(leaf) and "\n" not in item["reason"], item["reason"]
    sent = sorted(base64.b64decode(i["payload_base64"]) for i in items)
    assert sent == sorted(json.dumps(b).encode() for b in bad)  # the bytes as received
    assert _device(api)[key] == good  # never replaced by a refused document
    # ingest goes on: the next valid state is stored
    later = (
        status_message("scanning", at="2026-01-01T12:00:05.000Z")
        if leaf == "status"
        else ota_state_message(4, 3)
    ).to_json()
    publish(mosquitto.port, f"{PREFIX}/{leaf}", json.dumps(later), retain=True)
    assert wait_until(lambda: _device(api).get(key) == later, 10), _device(api)


def test_a_status_of_the_previous_app_version_is_stored_in_the_current_shape(
    mosquitto: Mosquitto, api: httpx.Client
) -> None:
    """The previous app version built status without ``shadow``: still archived, as a current
    document (``shadow`` null), not set aside."""
    current = status_message("idle").to_json()
    older = {k: v for k, v in current.items() if k != "shadow"}
    publish(mosquitto.port, f"{PREFIX}/status", json.dumps(older), retain=True)
    assert wait_until(lambda: _device(api).get("status") is not None, 10)
    assert _device(api)["status"] == current
    assert _rejected(api) == []


def test_availability_the_model_refuses_is_set_aside(
    mosquitto: Mosquitto, api: httpx.Client
) -> None:
    publish(mosquitto.port, f"{PREFIX}/availability", "online", retain=True)
    assert wait_until(lambda: _device(api).get("availability") == "online", 10)
    publish(mosquitto.port, f"{PREFIX}/availability", "asleep", retain=True)
    assert wait_until(lambda: len(_rejected(api)) == 1, 10)
    assert _rejected(api)[0]["reason"].startswith("availability")
    assert _device(api)["availability"] == "online"


def test_the_demo_reads_status_and_results_with_the_models() -> None:
    """``omis demo`` shows what the models accept: a refused status or result changes nothing."""
    from deploy.demo import DEVICE_ID, PREFIX, DemoRun, _handle
    from deploy.messages.testing import result_json

    run, base = DemoRun(), f"{PREFIX}/{DEVICE_ID}"
    good = status_message("idle", device=DEVICE_ID).to_json()
    _handle(run, f"{base}/status", json.dumps(good).encode())
    _handle(run, f"{base}/status", json.dumps({**good, "state": "asleep"}).encode())
    assert run.status == good
    result = result_json(1, device=DEVICE_ID)
    refused = {**result, "seq": 0, "message_id": "another"}
    for body in (result, refused, result):
        _handle(run, f"{base}/result", json.dumps(body).encode())
    assert list(run.results) == [result["message_id"]] and run.duplicates == 1


def test_the_fleet_offerer_halts_on_a_malformed_ota_state_with_one_line(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    """``omis fleet``: a device whose retained ``ota/state`` its model refuses is a ``timeout``
    naming the problem, and nothing is offered to it."""
    from broker_support import Collector

    from deploy.broker import parse_broker_url
    from deploy.fleet.offer import MqttOfferer

    device = "odd-1"
    bad = {**ota_state_message(1).to_json(), "current": "one"}
    publish(mosquitto.port, f"omis/v1/{device}/ota/state", json.dumps(bad), retain=True)
    offerer = MqttOfferer(
        parse_broker_url(mosquitto.url), "omis/v1", tmp_path / "v2.tar", 2, state_wait_s=3
    )
    with Collector(mosquitto.port, f"omis/v1/{device}/cmd/#") as col:
        assert offerer.current_version(device) is None  # not known: the offer says why
        outcome = offerer.offer(device)
        assert col.messages == []
    assert outcome.step == "timeout" and outcome.version is None
    assert outcome.detail.startswith(f"device {device} sent a malformed ota/state: current")
    assert "\n" not in outcome.detail
