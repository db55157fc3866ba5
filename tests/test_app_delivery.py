"""Results reach a real mosquitto through outages, restarts and a SIGKILLed appliance.

Every test starts its own broker on a free port.  A consumer de-duplicates by ``message_id``;
the assertions are "every result at least once, none lost".
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from broker_support import (
    Collector,
    FakeScanner,
    Mosquitto,
    app_config,
    appliance_child,
    mosquitto_fixture,  # noqa: F401 - the "mosquitto" fixture
    publish,
    running_appliance,
    wait_until,
)

from deploy.appliance.base import ScanRequest
from deploy.appliance.service import Appliance
from deploy.broker import parse_broker_url
from deploy.config import MqttConfig, load_config
from deploy.exceptions import ScanRejectedError
from deploy.mqtt import MqttLink, OutboxPump, Topics
from deploy.outbox import Outbox
from deploy.schemas import validate

BASE = "omis/v1/dev1"


@contextlib.contextmanager
def running(config: dict[str, Any], state_dir: Path, scanner: FakeScanner) -> Iterator[Appliance]:
    """An in-process appliance with its supervision loop on a thread."""
    app = Appliance(load_config(environ={}, overrides=config), state_dir, scanner)
    with running_appliance(app):
        yield app


def submit(app: Appliance, *slides: str) -> None:
    for slide in slides:
        app.submit(ScanRequest(slide, 2))


def test_results_validated_by_mosquitto_sub(mosquitto: Mosquitto, tmp_path: Path) -> None:
    sub = subprocess.Popen(
        [
            "mosquitto_sub",
            "-h",
            "127.0.0.1",
            "-p",
            str(mosquitto.port),
            "-V",
            "mqttv5",
            "-q",
            "1",
            "-t",
            f"{BASE}/result",
            "-C",
            "3",
            "-W",
            "30",
            "-i",
            "sub-validate",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    with Collector(mosquitto.port, f"{BASE}/#") as col:
        # Ready when the broker has answered mosquitto_sub's SUBSCRIBE (its log says so).
        suback = "Sending SUBACK to sub-validate"
        assert wait_until(lambda: suback in mosquitto.log_text(), 10), mosquitto.log_text()
        with running(app_config(mosquitto.url), tmp_path / "state", FakeScanner()) as app:
            submit(app, "S-1", "S-2", "S-3")
            out, _ = sub.communicate(timeout=30)
            assert wait_until(lambda: app.outbox.stats().rows == 0, 10)
        assert wait_until(lambda: col.on("/availability")[-1:] == [b"stopped"], 5)
    results = [json.loads(line) for line in out.splitlines()]
    assert sub.returncode == 0
    assert [r["slide_id"] for r in results] == ["S-1", "S-2", "S-3"]
    assert [r["seq"] for r in results] == [1, 2, 3]
    for result in results:
        validate("result", result)
    statuses = col.json_on("/status")
    for status in statuses:
        validate("status", status)
    assert {s["state"] for s in statuses} >= {"idle", "scanning"}
    assert col.on("/availability")[0] == b"online"


def test_first_result_goes_out_once_when_the_online_hook_is_late(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    """The link is connected before its ``on_online`` hook runs, so the pump may send the first
    row before the hook calls ``reconnected()``: that call must not replay the row on a healthy
    link (issue 19 §7).  The hook here waits until the pump has sent, which makes the race
    certain instead of occasional."""
    topics = Topics("omis/v1", "dev1")
    pumps: list[OutboxPump] = []

    def late_hook() -> None:
        wait_until(lambda: pumps[0].published >= 1, 5)
        pumps[0].reconnected()

    stop = threading.Event()
    with Outbox(tmp_path / "o.db") as box, Collector(mosquitto.port, f"{BASE}/result") as col:
        box.put("m-first", topics.result, b'{"n":1}')
        link = MqttLink(MqttConfig(), parse_broker_url(mosquitto.url), topics, on_online=late_hook)
        pump = OutboxPump(box, link, max_inflight=4)
        pumps.append(pump)
        link.on_puback = pump.on_puback
        worker = threading.Thread(target=pump.run, args=(stop,), daemon=True)
        worker.start()
        link.start()
        try:
            assert wait_until(lambda: box.stats().rows == 0, 10)
            box.put("m-marker", topics.result, b'{"n":2}')
            pump.notify()
            # FIFO on one connection: a duplicate of the first row would arrive before this.
            assert wait_until(lambda: col.on("/result")[-1:] == [b'{"n":2}'], 10)
        finally:
            stop.set()
            pump.notify()
            worker.join(5)
            link.close()
    assert col.on("/result") == [b'{"n":1}', b'{"n":2}']


def test_broker_down_when_scanning_starts(tmp_path: Path) -> None:
    broker = Mosquitto(tmp_path, persistent=True).start()
    try:
        with Collector(broker.port, f"{BASE}/result", durable=True) as col:
            broker.stop()
            with running(app_config(broker.url), tmp_path / "state", FakeScanner()) as app:
                submit(app, "A", "B", "C")
                assert wait_until(lambda: app.outbox.stats().rows == 3, 10)
                assert not app.link or not app.link.connected.is_set()
                broker.start()
                assert wait_until(lambda: len(col.unique_results()) == 3, 20), broker.log_text()
                assert wait_until(lambda: app.outbox.stats().rows == 0, 10)
            got = sorted(r["slide_id"] for r in col.unique_results().values())
            assert got == ["A", "B", "C"]
    finally:
        broker.stop()


def test_broker_killed_and_restarted_mid_scan(tmp_path: Path) -> None:
    broker = Mosquitto(tmp_path, persistent=True).start()
    slides = [f"S{i}" for i in range(8)]
    try:
        with (
            Collector(broker.port, f"{BASE}/#", durable=True) as col,
            running(app_config(broker.url), tmp_path / "state", FakeScanner(delay_s=0.1)) as app,
        ):
            submit(app, *slides)
            assert wait_until(lambda: len(col.unique_results()) >= 2, 10)
            boot = app.identity.boot_id
            broker.stop()
            # the collector's session (and what it has not received) survives in the broker's
            # file: without it, results sent before the collector reconnects are not queued
            assert (tmp_path / "mosquitto.db").is_file(), broker.log_text()[-2000:]
            statuses_before = len(col.on("/status"))
            time.sleep(1.0)
            broker.start()
            arrived = wait_until(lambda: len(col.unique_results()) == 8, 30)
            assert arrived, (
                f"{len(col.unique_results())} of 8 results; outbox {app.outbox.stats()}; "
                f"link connected {app.link.connected.is_set()}\n{broker.log_text()[-2000:]}"
            )
            assert wait_until(lambda: app.outbox.stats().rows == 0, 10)
            # Retained status and availability are republished after the reconnect.
            assert wait_until(lambda: len(col.on("/status")) > statuses_before, 5)
            assert col.on("/availability")[-1] == b"online"
        unique = col.unique_results()
        by_slide = {r["slide_id"]: r for r in unique.values()}
        assert sorted(by_slide) == sorted(slides)
        assert sorted(r["seq"] for r in unique.values()) == list(range(1, 9))
        assert {r["boot_id"] for r in unique.values()} == {boot}
    finally:
        broker.stop()


def outbox_rows(state_dir: Path) -> int:
    """Rows in a running daemon's outbox, from its health file (the daemon holds the database
    exclusively, so no other process opens it while it runs)."""
    try:
        return int(json.loads((state_dir / "run" / "health.json").read_text())["outbox_rows"])
    except (OSError, ValueError, KeyError):
        return -1


def test_appliance_sigkilled_between_commit_and_puback(tmp_path: Path) -> None:
    broker = Mosquitto(tmp_path, persistent=True).start()
    state = tmp_path / "state"
    config = app_config(broker.url)
    child = None
    try:
        with Collector(broker.port, f"{BASE}/#", durable=True) as col:
            child = appliance_child(config, state, ["K1", "K2"], delay_s=0.4)
            assert child.stdout is not None
            assert child.stdout.readline().strip() == "READY"
            assert wait_until(lambda: b"online" in col.on("/availability"), 10)
            broker.pause()  # no PUBACK from now on
            assert wait_until(lambda: outbox_rows(state) == 2, 20)
            time.sleep(0.3)  # the pump hands both to paho, which writes them to the socket
            os.kill(child.pid, signal.SIGKILL)
            child.wait(10)
            broker.resume()
            assert wait_until(lambda: b"offline" in col.on("/availability"), 15)
            child = appliance_child(config, state, [])
            assert child.stdout is not None
            assert child.stdout.readline().strip() == "READY"
            assert wait_until(lambda: len(col.unique_results()) == 2, 20), broker.log_text()
            assert wait_until(lambda: outbox_rows(state) == 0, 10)
            child.send_signal(signal.SIGTERM)
            assert child.wait(20) == 0
            assert wait_until(lambda: col.on("/availability")[-1:] == [b"stopped"], 5)
        results = col.results()
        assert sorted({r["slide_id"] for r in results}) == ["K1", "K2"]
        # A redelivery carries the same message_id: one id per slide, however many copies.
        ids_by_slide: dict[str, set[str]] = {}
        for r in results:
            ids_by_slide.setdefault(r["slide_id"], set()).add(r["message_id"])
        assert all(len(ids) == 1 for ids in ids_by_slide.values())
    finally:
        if child is not None and child.poll() is None:
            child.kill()
            child.wait()
        broker.stop()


def replies_on(col: Collector, verb: str) -> list[dict[str, Any]]:
    return col.json_on(f"/cmd/{verb}/reply")


def test_bad_commands_over_mqtt_never_kill_the_daemon(mosquitto: Mosquitto, tmp_path: Path) -> None:
    port = mosquitto.port
    config = app_config(mosquitto.url, mqtt={"max_command_bytes": 1024})
    with (
        Collector(port, "omis/v1/#") as col,
        running(config, tmp_path / "state", FakeScanner(delay_s=0.3)) as app,
    ):
        assert wait_until(lambda: b"online" in col.on("/availability"), 10)
        publish(port, f"{BASE}/cmd/scan", b"{oops", correlation=b"c-malformed")
        publish(port, f"{BASE}/cmd/scan", json.dumps({"slide_id": "x" * 5000}), b"c-big")
        publish(port, f"{BASE}/cmd/selfdestruct", b"{}", correlation=b"c-unknown")
        publish(port, f"{BASE}/cmd/scan", b'{"slide_id": "A", "device_id": "dev2"}', b"c-dev")
        publish(port, "omis/v1/dev2/cmd/scan", b'{"slide_id": "NOT-MINE"}', b"c-other")
        publish(port, f"{BASE}/cmd/scan", b'{"slide_id": "OK-1", "correlation_id": "c-ok"}')
        assert wait_until(lambda: len(replies_on(col, "scan")) == 4, 10)
        assert wait_until(lambda: len(replies_on(col, "selfdestruct")) == 1, 5)
        codes = {
            r["correlation_id"]: r.get("error", {}).get("code") for r in replies_on(col, "scan")
        }
        assert codes == {
            "c-malformed": "malformed",
            "c-big": "too_large",
            "c-dev": "wrong_device",
            "c-ok": None,
        }
        assert replies_on(col, "selfdestruct")[0]["error"]["code"] == "unknown_command"
        # MQTT 5 correlation data is echoed as a property too.
        props = [p for t, _, p in col.messages if t.endswith("/cmd/scan/reply")]
        assert {p.CorrelationData for p in props if hasattr(p, "CorrelationData")} >= {b"c-big"}
        # Cancel the running scan.
        publish(port, f"{BASE}/cmd/scan", b'{"slide_id": "LONG", "fields": 50}', b"c-long")
        assert wait_until(
            lambda: app.queue.current is not None and app.queue.current.slide_id == "LONG", 10
        )
        publish(port, f"{BASE}/cmd/cancel", b"{}", correlation=b"c-cancel")
        assert wait_until(lambda: len(replies_on(col, "cancel")) == 1, 5)
        assert replies_on(col, "cancel")[0]["ok"] is True
        assert wait_until(lambda: app.counters.scans_cancelled == 1, 10)
        # ... and it still ends in a published outcome, through the outbox and the broker.
        assert wait_until(lambda: any(r["slide_id"] == "LONG" for r in col.results()), 10)
        (long,) = [r for r in col.unique_results().values() if r["slide_id"] == "LONG"]
        validate("result", long)
        assert (long["outcome"], long["prediction"]["label"]) == ("cancelled", None)
        assert "cancelled" in long["reason"]
        publish(port, f"{BASE}/cmd/status", b"{}", correlation=b"c-status")
        assert wait_until(lambda: len(replies_on(col, "status")) == 1, 5)
        for verb in ("scan", "cancel", "status", "selfdestruct"):
            for reply in replies_on(col, verb):
                validate("reply", reply)
        assert wait_until(lambda: "OK-1" in {r["slide_id"] for r in col.results()}, 10)
        assert "NOT-MINE" not in {r["slide_id"] for r in col.results()}
        assert app.supervisor.dead() == []


def test_outbox_full_refuses_scans_and_reports_degraded(tmp_path: Path) -> None:
    broker = Mosquitto(tmp_path)  # not started: nothing can be acknowledged
    # No archive here: the PUBACK frees the row (with receipts the archive's receipt would).
    config = app_config(broker.url, outbox={"max_rows": 2, "receipts": False})
    with running(config, tmp_path / "state", FakeScanner()) as app:
        submit(app, "F1", "F2")
        assert wait_until(lambda: app.outbox.stats().rows == 2, 10)
        with pytest.raises(ScanRejectedError) as info:
            submit(app, "F3")
        assert info.value.code == "outbox_full"
        assert app.publish_status()["state"] == "degraded"
        broker.start()
        try:
            assert wait_until(lambda: app.outbox.stats().rows == 0, 15)
            assert app.publish_status()["state"] == "idle"
            submit(app, "F3")
        finally:
            app.request_stop()
            broker.stop()


def test_thousand_results_queued_during_outage_drain(tmp_path: Path) -> None:
    broker = Mosquitto(tmp_path, persistent=True).start()
    n = 1000
    try:
        with Collector(broker.port, f"{BASE}/result", durable=True) as col:
            broker.stop()
            with running(app_config(broker.url), tmp_path / "state", FakeScanner()) as app:
                for i in range(n):
                    body = json.dumps({"message_id": f"m-{i:04d}", "i": i}).encode()
                    app.outbox.put(f"m-{i:04d}", f"{BASE}/result", body)
                broker.start()
                t0 = time.monotonic()
                assert wait_until(lambda: len(col.unique_results()) == n, 60)
                elapsed = time.monotonic() - t0
                assert wait_until(lambda: app.outbox.stats().rows == 0, 10)
        order = [r["i"] for r in col.results()]
        assert sorted(set(order)) == list(range(n))
        first_seen = list(dict.fromkeys(order))
        assert first_seen == list(range(n))  # FIFO
        print(f"\n1000 queued results drained in {elapsed:.2f} s after reconnect")
    finally:
        broker.stop()


# Response topics must lie under the reply prefix (issue 14; deploy/requests.py).
INBOX = f"{BASE}/reply/requester/dash-1"


def test_mqtt5_response_topic_gets_a_copy_of_the_reply(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    port = mosquitto.port
    config = app_config(mosquitto.url)
    with (
        Collector(port, "omis/v1/#") as col,
        Collector(port, f"{BASE}/reply/#", client_id="requester") as inbox,
        running(config, tmp_path / "state", FakeScanner()),
    ):
        assert wait_until(lambda: b"online" in col.on("/availability"), 10)
        publish(port, f"{BASE}/cmd/status", b"{}", b"c-rt", response_topic=INBOX)
        publish(port, f"{BASE}/cmd/nope", b"{}", b"c-bad-rt", response_topic=f"{BASE}/reply/+")
        assert wait_until(lambda: len(inbox.on(INBOX)) == 1, 10)
        assert wait_until(lambda: len(replies_on(col, "nope")) == 1, 5)
        time.sleep(0.3)  # a wildcard response topic must not produce a second copy
    (reply,) = inbox.json_on(INBOX)
    assert reply == replies_on(col, "status")[0]  # the documented reply topic still gets it
    assert reply["correlation_id"] == "c-rt" and reply["ok"] is True
    validate("reply", reply)
    props = [p for t, _, p in inbox.messages if t == INBOX]
    assert props[0].CorrelationData == b"c-rt"
    assert [t for t, _, _ in inbox.messages] == [INBOX]


def test_a_failed_scan_is_published_through_the_outbox(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    config = app_config(mosquitto.url)
    scanner = FakeScanner(fail_slides=frozenset({"BAD"}))
    with (
        Collector(mosquitto.port, f"{BASE}/result") as col,
        running(config, tmp_path / "state", scanner) as app,
    ):
        submit(app, "BAD", "GOOD")
        assert wait_until(lambda: len(col.unique_results()) == 2, 10)
        assert wait_until(lambda: app.outbox.stats().rows == 0, 10)
    by_slide = {r["slide_id"]: r for r in col.unique_results().values()}
    for result in by_slide.values():
        validate("result", result)
    bad = by_slide["BAD"]
    assert (bad["outcome"], bad["stage"], bad["prediction"]["label"]) == (
        "failed",
        "internal",
        None,
    )
    assert "focus lost" in bad["reason"]
    assert by_slide["GOOD"]["outcome"] == "classified"
    assert [bad["seq"], by_slide["GOOD"]["seq"]] == [1, 2]


def test_a_deleted_outbox_under_the_daemon_is_reported_and_recreated(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    with (
        Collector(mosquitto.port, f"{BASE}/#") as col,
        running(app_config(mosquitto.url), state, FakeScanner()) as app,
    ):
        submit(app, "D-1")
        assert wait_until(lambda: len(col.unique_results()) == 1, 10)
        for suffix in ("", "-wal", "-shm"):
            Path(f"{state / 'outbox.sqlite'}{suffix}").unlink(missing_ok=True)

        def degraded() -> bool:
            return any(
                s["state"] == "degraded" and "outbox_recreated" in s["reasons"]
                for s in col.json_on("/status")
            )

        assert wait_until(degraded, 10), col.json_on("/status")[-1]
        last = col.json_on("/status")[-1]["last_error"]
        assert last["code"] == "outbox_recreated" and "deleted" in last["message"]
        submit(app, "D-2")  # results still go through the recreated outbox
        assert wait_until(lambda: len(col.unique_results()) == 2, 10)
        assert (state / "outbox.sqlite").exists()
