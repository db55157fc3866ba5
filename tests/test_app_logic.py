"""Appliance logic against in-memory fakes: commands, fuzz, queue, status, supervisor, notify."""

from __future__ import annotations

import json
import os
import re
import socket
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from broker_support import SHA, FakeScanner
from hypothesis import given, settings
from hypothesis import strategies as st

from deploy.appliance.base import ScanRequest
from deploy.appliance.commands import CommandFailed, CommandRouter
from deploy.appliance.health import check_health, write_health
from deploy.appliance.notify import sd_notify, watchdog_interval_s
from deploy.appliance.queue import ScanQueue
from deploy.appliance.results import Identity, build_result, rfc3339
from deploy.appliance.status import Snapshot, StatusTracker
from deploy.appliance.supervisor import Supervisor
from deploy.exceptions import ScanRejectedError, SchemaError, ServiceError
from deploy.outbox import OutboxStats
from deploy.schemas import SCHEMA_NAMES, load_schema, validate

DEVICE = "dev1"


class Replies:
    """Collects what the router sends."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, dict[str, Any], bytes | None]] = []
        self.response_topics: list[str | None] = []

    def __call__(
        self, verb: str, payload: bytes, correlation: bytes | None, response_topic: str | None
    ) -> None:
        self.sent.append((verb, json.loads(payload), correlation))
        self.response_topics.append(response_topic)


def make_router() -> tuple[CommandRouter, Replies, list[dict[str, Any]]]:
    replies = Replies()
    seen: list[dict[str, Any]] = []
    router = CommandRouter(DEVICE, 1024, replies)

    def scan(req: dict[str, Any]) -> dict[str, Any]:
        seen.append(req)
        if req["slide_id"] == "full":
            raise CommandFailed("queue_full", "no room")
        if req["slide_id"] == "boom":
            raise RuntimeError("handler bug")
        return {"scan_id": "s1"}

    router.register("scan", "cmd_scan", scan)
    router.register("cancel", "cmd_cancel", lambda req: {"cancelled": []})
    return router, replies, seen


@pytest.mark.parametrize(
    ("verb", "payload", "code"),
    [
        ("scan", b"{not json", "malformed"),
        ("scan", b"\xff\xfe", "malformed"),
        ("scan", b"[1, 2]", "malformed"),
        ("scan", b'{"slide_id": "' + b"a" * 2000 + b'"}', "too_large"),
        ("scan", b'{"fields": 3}', "invalid"),
        ("scan", b'{"slide_id": "a b"}', "invalid"),
        ("scan", b'{"slide_id": "a", "fields": 0}', "invalid"),
        ("scan", b'{"slide_id": "a", "extra": 1}', "invalid"),
        ("scan", b'{"slide_id": "a", "device_id": "other"}', "wrong_device"),
        ("scan", b'{"slide_id": "full"}', "queue_full"),
        ("scan", b'{"slide_id": "boom"}', "internal"),
        ("reboot", b"{}", "unknown_command"),
    ],
)
def test_bad_commands_get_error_replies(verb: str, payload: bytes, code: str) -> None:
    router, replies, _ = make_router()
    reply = router.handle(verb, payload, b"corr-1")
    assert reply is not None
    assert reply["ok"] is False
    assert reply["error"]["code"] == code
    assert reply["correlation_id"] == "corr-1"
    validate("reply", reply)
    assert replies.sent == [(verb, reply, b"corr-1")]


def test_good_command_reply_carries_json_correlation_id() -> None:
    router, _replies, seen = make_router()
    reply = router.handle("scan", b'{"slide_id": "S-1", "correlation_id": "abc"}', None)
    assert reply is not None
    assert reply["ok"] is True
    assert reply["result"] == {"scan_id": "s1"}
    assert reply["correlation_id"] == "abc"
    validate("reply", reply)
    assert seen[0]["slide_id"] == "S-1"


def test_response_topic_is_passed_to_the_reply_sender() -> None:
    router, replies, _ = make_router()
    router.handle("scan", b'{"slide_id": "S-1"}', b"c", "clients/dash/inbox")
    router.handle("nope", b"{}", None)
    assert replies.response_topics == ["clients/dash/inbox", None]


def test_every_error_code_the_appliance_raises_is_in_the_reply_schema() -> None:
    # A code missing from the enum makes the reply fail its own shipped schema.
    import deploy.appliance as pkg

    enum = set(load_schema("reply")["$defs"]["ReplyCode"]["enum"])
    patterns = (
        r'CommandFailed\(\s*"([a-z_]+)"',  # handler refusals
        r'"code": "([a-z_]+)"',  # the OTA worker's late verdict
        r'ScanRejectedError\(\s*f?"[^"]*",\s*"([a-z_]+)"\s*\)',  # scan admission (exc.code)
    )
    raised: set[str] = set()
    for source in Path(pkg.__path__[0]).glob("*.py"):
        text = source.read_text("utf-8")
        for pattern in patterns:
            raised |= set(re.findall(pattern, text))
    assert {"busy", "rejected", "unavailable", "outbox_full", "queue_full"} <= raised
    assert raised <= enum, raised - enum


def test_unusable_verbs_are_ignored_without_reply() -> None:
    router, replies, _ = make_router()
    assert router.handle("x" * 65, b"{}", None) is None
    assert router.handle("", b"{}", None) is None
    assert replies.sent == []


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=12,
)
scan_like = st.fixed_dictionaries(
    {"slide_id": st.text(max_size=30) | st.integers()},
    optional={
        "fields": st.integers(-5, 2000) | st.text(max_size=3),
        "plan": st.text(max_size=10),
        "device_id": st.sampled_from([DEVICE, "other", ""]),
        "correlation_id": st.text(max_size=10) | st.integers(),
        "zzz": json_values,
    },
)
payloads = (
    st.binary(max_size=300)
    | json_values.map(lambda v: json.dumps(v).encode())
    | scan_like.map(lambda v: json.dumps(v).encode())
)


@settings(max_examples=300, deadline=None)
@given(verb=st.sampled_from(["scan", "cancel", "ota", "nope"]), payload=payloads)
def test_fuzzed_commands_always_get_a_valid_reply(verb: str, payload: bytes) -> None:
    router, replies, seen = make_router()
    reply = router.handle(verb, payload, None)
    assert reply is not None
    validate("reply", reply)
    for request in seen:  # whatever reached the handler passed the schema
        validate("cmd_scan", request)
    assert len(replies.sent) == 1


def test_every_schema_loads_and_rejects_garbage() -> None:
    for name in SCHEMA_NAMES:
        schema = load_schema(name)
        assert schema["$schema"].endswith("2020-12/schema")
        with pytest.raises(SchemaError):
            validate(name, [1] if name != "availability" else "maybe")


def test_result_envelope_matches_schema_and_has_a_fresh_uuid() -> None:
    identity = Identity(DEVICE, "boot1")
    request = ScanRequest("S-1", 2)
    report = FakeScanner().scan(request, threading.Event())
    a = build_result(
        identity, seq=1, request=request, started_at=rfc3339(), finished_at=rfc3339(), report=report
    ).to_json()
    b = build_result(
        identity, seq=2, request=request, started_at=rfc3339(), finished_at=rfc3339(), report=report
    ).to_json()
    validate("result", a)
    assert a["message_id"] != b["message_id"]
    assert a["finished_at"].endswith("Z")
    assert a["simulation"]["pap_group"] == "II"
    broken = dict(a, model={"name": "x", "version": 1, "sha256": "short"})
    with pytest.raises(SchemaError, match="model/sha256"):
        validate("result", broken)


def snapshot(current: ScanRequest | None = None, full: bool = False) -> Snapshot:
    return Snapshot(current, 0, 4, OutboxStats(3 if full else 0, 10, full, 3, 1000))


def test_status_state_rule_and_schema() -> None:
    tracker = StatusTracker(Identity(DEVICE, "b"), "0.1.0")
    assert tracker.state(snapshot())[0] == "degraded"  # no scanner info yet
    tracker.info = FakeScanner().open()
    assert tracker.state(snapshot())[0] == "idle"
    assert tracker.state(snapshot(ScanRequest("s", 1)))[0] == "scanning"
    tracker.updating = True
    assert tracker.state(snapshot())[0] == "updating"
    assert tracker.state(snapshot(full=True)) == ("degraded", ["outbox_full"])
    tracker.record_error("scan_failed", "boom")
    tracker.fatal = "worker died"
    payload = tracker.payload(snapshot())
    assert payload["state"] == "error"
    assert payload["model"]["sha256"] == SHA
    assert payload["last_error"]["code"] == "scan_failed"
    validate("status", payload)


def test_scan_queue_bound_cancel_and_close() -> None:
    queue = ScanQueue(2)
    a, b, c = ScanRequest("a", 1), ScanRequest("b", 1), ScanRequest("c", 1)
    assert queue.put(a) == 0
    assert queue.put(b) == 1
    with pytest.raises(ScanRejectedError) as info:
        queue.put(c)
    assert info.value.code == "queue_full"
    assert queue.cancel(b.scan_id) == [b.scan_id]
    assert queue.get(0.1) is a
    assert queue.cancel() == [a.scan_id]
    assert queue.cancel_event.is_set()
    # A scan already being cancelled (still winding down) is not cancelled again.
    assert queue.cancel() == [] and queue.cancel(a.scan_id) == []
    assert queue.cancel("unknown") == []
    queue.done()
    queue.put(c)
    assert [r.slide_id for r in queue.close()] == ["c"]
    with pytest.raises(ScanRejectedError):
        queue.put(a)
    assert queue.wait_idle(0.1)


def test_supervisor_restarts_then_gives_up() -> None:
    calls: list[int] = []

    def flaky(stop: threading.Event) -> None:
        calls.append(1)
        raise RuntimeError("crash")

    sup = Supervisor(max_restarts=2, window_s=60)
    sup.add("flaky", flaky)
    sup.start()
    for _ in range(2):
        assert _wait(lambda: sup.dead() == ["flaky"])
        sup.check()
    assert _wait(lambda: sup.dead() == ["flaky"])
    with pytest.raises(ServiceError, match="flaky"):
        sup.check()
    assert len(calls) == 3
    assert sup.last_error == "RuntimeError: crash"
    sup.stop()


def test_supervisor_stops_healthy_workers() -> None:
    sup = Supervisor()
    sup.add("loop", lambda stop: stop.wait())
    sup.start()
    sup.check()
    assert sup.dead() == []
    sup.stop(2)
    assert sup.dead() == []


def _wait(pred: Any, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.01)
    return False


def test_health_file(tmp_path: Path) -> None:
    assert check_health(tmp_path, 1.0)[0] is False
    write_health(tmp_path, {"state": "idle", "connected": True, "outbox_rows": 0})
    healthy, reason = check_health(tmp_path, 1.0)
    assert healthy, reason
    assert not check_health(tmp_path, 1.0, now=time.clock_gettime(time.CLOCK_BOOTTIME) + 10)[0]
    write_health(tmp_path, {"state": "error", "last_error": "x"})
    assert not check_health(tmp_path, 1.0)[0]


def test_sd_notify_over_a_real_datagram_socket(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert sd_notify("READY=1") is False or "NOTIFY_SOCKET" in os.environ
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind(str(path))
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        assert sd_notify("READY=1")
        assert server.recv(100) == b"READY=1"
    monkeypatch.setenv("WATCHDOG_USEC", "4000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert watchdog_interval_s() == 2.0
    monkeypatch.setenv("WATCHDOG_PID", "1")
    assert watchdog_interval_s() is None


@pytest.mark.parametrize("step_s", [-3600.0, -10.0, 3600.0])
def test_health_clock_is_monotonic(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, step_s: float
) -> None:
    """A hung daemon (no heartbeat for 100 s) is unhealthy even when the wall clock steps back
    meanwhile; a live one stays healthy when the wall clock steps forward."""
    real_time, real_mono, real_clock = time.time, time.monotonic, time.clock_gettime
    wall, later = real_time(), 0.0

    def fake_clock(clock: int) -> float:
        return real_clock(clock) + later

    monkeypatch.setattr(time, "time", lambda: wall)
    monkeypatch.setattr(time, "monotonic", lambda: real_mono() + later)
    monkeypatch.setattr(time, "clock_gettime", fake_clock)
    write_health(tmp_path, {"state": "idle", "connected": True, "outbox_rows": 0})
    assert check_health(tmp_path, 1.0)[0]
    wall = real_time() + step_s  # the wall clock steps (NTP, an RTC without battery, an admin)
    later = 100.0  # ... while the daemon writes nothing for 100 s: hung
    healthy, reason = check_health(tmp_path, 1.0)
    assert not healthy and "stale" in reason, reason
    write_health(tmp_path, {"state": "idle", "connected": True, "outbox_rows": 0})
    healthy, reason = check_health(tmp_path, 1.0)  # alive again: healthy whatever the wall says
    assert healthy, reason


def test_a_health_stamp_from_the_future_is_not_fresh(tmp_path: Path) -> None:
    """The boot clock never goes back, so a stamp ahead of it (a faked or foreign clock) is
    not taken for a live daemon."""
    write_health(tmp_path, {"state": "idle", "connected": True, "outbox_rows": 0})
    now = time.clock_gettime(time.CLOCK_BOOTTIME)
    assert check_health(tmp_path, 1.0, now=now)[0]
    assert not check_health(tmp_path, 1.0, now=now - 3600)[0]
