"""Scan and cancel through the archive API (issue 22 §4): who, when and what is audited.

A real mosquitto, the archive's own MQTT session (:class:`ArchiveSubscriber`) and a fake device
peer that answers ``cmd/<verb>`` on ``cmd/<verb>/reply`` as the appliance does (the appliance
itself is driven by the dashboard test in test_dashboard_archive.py).  SQLite and PostgreSQL.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from typing import Any

import paho.mqtt.client as paho
import pytest
from broker_support import Mosquitto, mosquitto_fixture, wait_until  # noqa: F401
from collector_support import database_url, postgres_server  # noqa: F401
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from review_support import PASSWORD, USERS, Archive, open_archive

from deploy.collector.config import CollectorMqtt
from deploy.messages.base import rfc3339
from deploy.messages.reply import ReplyMessage

PREFIX = "omis/v1"
DEVICE = "scope-11"


class FakeDevice:
    """A device peer: records every command; answers each (unless ``silent``) like the
    appliance: ``scan`` accepted, ``cancel`` refused ``not_found`` when nothing runs."""

    def __init__(self, port: int, device: str = DEVICE) -> None:
        self.device = device
        self.commands: list[tuple[str, dict[str, Any]]] = []
        self.silent = False
        self.ready = threading.Event()
        self.client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"fake-{device}",
            protocol=MQTTProtocolVersion.MQTTv5,
        )
        self.client.on_connect = lambda c, *_: c.subscribe(f"{PREFIX}/+/cmd/+", qos=1)
        self.client.on_subscribe = lambda *_: self.ready.set()
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        assert self.ready.wait(10)

    def _on_message(self, client: Any, _u: Any, msg: paho.MQTTMessage) -> None:
        verb = msg.topic.rsplit("/", 1)[-1]
        body = json.loads(msg.payload)
        self.commands.append((msg.topic, body))
        if self.silent or not msg.topic.startswith(f"{PREFIX}/{self.device}/"):
            return
        if verb == "scan":
            result: dict[str, Any] | None = {
                "slide_id": body["slide_id"], "scan_id": "scan-1", "position": 0
            }  # fmt: skip
            error = None
        else:
            result, error = None, {"code": "not_found", "message": "no scan to cancel"}
        reply = ReplyMessage(
            device_id=self.device,
            verb=verb,
            correlation_id=body.get("correlation_id"),
            ok=error is None,
            result=result,
            error=error,
            at=rfc3339(),
        )
        client.publish(f"{msg.topic}/reply", reply.payload(), qos=1)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def setup(mosquitto: Mosquitto, db_url: str) -> Iterator[tuple[Archive, FakeDevice]]:
    config = CollectorMqtt(broker=mosquitto.url, client_id="archive-cmd", prefix=PREFIX)
    archive = open_archive(db_url, mqtt=config, command_timeout_s=2.0)
    device = FakeDevice(mosquitto.port)
    try:
        assert archive.subscriber is not None and archive.subscriber.subscribed.wait(10)
        archive.store.set_availability(DEVICE, "online")
        yield archive, device
    finally:
        device.close()
        archive.close()


def _audit(archive: Archive, action: str) -> list[dict[str, Any]]:
    admin, _ = archive.login("admin")
    response = admin.get("/api/audit", params={"action": action})
    assert response.status_code == 200, response.text
    items: list[dict[str, Any]] = response.json()["items"]
    return items


def test_operator_scan_is_published_answered_and_audited(
    setup: tuple[Archive, FakeDevice],
) -> None:
    archive, device = setup
    api, csrf = archive.login("operator")
    body = {"slide_id": "S-77", "fields": 4, "plan": "quick"}
    response = api.post(f"/api/devices/{DEVICE}/scan", json=body, headers={"X-CSRF-Token": csrf})
    assert response.status_code == 200, response.text
    reply = response.json()
    assert reply["ok"] is True and reply["result"]["slide_id"] == "S-77"
    assert reply["verb"] == "scan" and reply["device_id"] == DEVICE
    [(topic, sent)] = device.commands
    assert topic == f"{PREFIX}/{DEVICE}/cmd/scan"
    assert {k: sent[k] for k in body} == body
    assert sent["device_id"] == DEVICE and sent["correlation_id"] == reply["correlation_id"]
    [entry] = _audit(archive, "command.scan")
    assert entry["user_name"] == "operator-1" and entry["role"] == "operator"
    assert entry["target"] == DEVICE and entry["client"]
    assert entry["detail"]["command"] == sent
    assert entry["detail"]["reply"] == "ok"


def test_cancel_refused_by_the_device_is_returned_and_audited(
    setup: tuple[Archive, FakeDevice],
) -> None:
    archive, device = setup
    api, csrf = archive.login("pathologist")  # above operator
    response = api.post(
        f"/api/devices/{DEVICE}/cancel", json={"scan_id": "scan-9"}, headers={"X-CSRF-Token": csrf}
    )
    assert response.status_code == 200, response.text
    assert response.json()["error"]["code"] == "not_found"
    assert device.commands[0][1]["scan_id"] == "scan-9"
    [entry] = _audit(archive, "command.cancel")
    assert entry["user_name"] == "pathologist-1"
    assert entry["detail"]["reply"] == "not_found"


def test_programs_send_with_basic_credentials_and_no_csrf(
    setup: tuple[Archive, FakeDevice],
) -> None:
    archive, device = setup
    response = archive.client().post(
        f"/api/devices/{DEVICE}/cancel", auth=(USERS["admin"], PASSWORD)
    )  # no body: the running scan
    assert response.status_code == 200, response.text
    [(topic, sent)] = device.commands
    assert topic.endswith("/cmd/cancel") and sent.get("scan_id") is None
    [entry] = _audit(archive, "command.cancel")
    assert entry["user_name"] == USERS["admin"] and entry["role"] == "admin"


def test_a_viewer_is_refused_and_nothing_is_sent(setup: tuple[Archive, FakeDevice]) -> None:
    archive, device = setup
    api, csrf = archive.login("viewer")
    for verb, body in (("scan", {"slide_id": "S-1"}), ("cancel", {})):
        response = api.post(
            f"/api/devices/{DEVICE}/{verb}", json=body, headers={"X-CSRF-Token": csrf}
        )
        assert response.status_code == 403, response.text
    assert not wait_until(lambda: device.commands, 0.5)
    assert _audit(archive, "command.scan") == []


def test_a_cookie_request_without_csrf_is_refused_and_nothing_is_sent(
    setup: tuple[Archive, FakeDevice],
) -> None:
    archive, device = setup
    api, _csrf = archive.login("operator")
    for headers in ({}, {"X-CSRF-Token": "forged"}):
        response = api.post(
            f"/api/devices/{DEVICE}/scan", json={"slide_id": "S-2"}, headers=headers
        )
        assert response.status_code == 403, response.text
        assert "CSRF" in response.json()["detail"]
    assert not wait_until(lambda: device.commands, 0.5)
    assert _audit(archive, "command.scan") == []


def test_bad_bodies_and_unknown_devices(setup: tuple[Archive, FakeDevice]) -> None:
    archive, device = setup
    api, csrf = archive.login("operator")
    headers = {"X-CSRF-Token": csrf}
    bad = [
        {},  # no slide
        {"slide_id": "../etc"},
        {"slide_id": "S-1", "fields": 0},
        {"slide_id": "S-1", "plan": "a b"},
        {"slide_id": "S-1", "correlation_id": "mine"},  # set by the archive, not the caller
        {"slide_id": "S-1", "device_id": "scope-12"},
        {"slide_id": "S-1", "extra": 1},
    ]
    for body in bad:
        response = api.post(f"/api/devices/{DEVICE}/scan", json=body, headers=headers)
        assert response.status_code == 422, (body, response.text)
    response = api.post(f"/api/devices/{DEVICE}/cancel", json={"slide": "x"}, headers=headers)
    assert response.status_code == 422, response.text
    for path in ("scope-404", "bad%20id", "x" * 65):
        response = api.post(f"/api/devices/{path}/scan", json={"slide_id": "S-1"}, headers=headers)
        assert response.status_code in (404, 422), (path, response.text)
    response = api.post("/api/devices/scope-404/scan", json={"slide_id": "S-1"}, headers=headers)
    assert response.status_code == 404
    assert not wait_until(lambda: device.commands, 0.5)
    assert _audit(archive, "command.scan") == []


def test_no_reply_is_a_504_and_the_attempt_is_audited(setup: tuple[Archive, FakeDevice]) -> None:
    archive, device = setup
    device.silent = True
    api, csrf = archive.login("operator")
    response = api.post(
        f"/api/devices/{DEVICE}/scan", json={"slide_id": "S-3"}, headers={"X-CSRF-Token": csrf}
    )
    assert response.status_code == 504, response.text
    assert "no reply" in response.json()["detail"]
    assert len(device.commands) == 1
    [entry] = _audit(archive, "command.scan")
    assert entry["detail"]["reply"] == "no_reply"
    assert entry["detail"]["command"]["slide_id"] == "S-3"


def test_without_an_mqtt_connection_the_api_says_so(db_url: str) -> None:
    archive = open_archive(db_url)
    try:
        archive.store.set_availability(DEVICE, "online")
        api, csrf = archive.login("operator")
        response = api.post(
            f"/api/devices/{DEVICE}/scan", json={"slide_id": "S-4"}, headers={"X-CSRF-Token": csrf}
        )
        assert response.status_code == 503, response.text
        [entry] = _audit(archive, "command.scan")
        assert entry["detail"]["reply"] == "not_sent"
    finally:
        archive.close()
