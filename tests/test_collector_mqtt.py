"""``omis collect`` against a real mosquitto: shared subscription, persistent sessions, SIGKILL.

Two collector processes share ``$share/omis-archive/omis/v1/+/result``; an appliance process
(the real daemon with the fake scanner) publishes results; one collector is SIGKILLed mid-scan
and restarted under its client id.  Every result the broker accepted must be in the database
exactly once -- on SQLite (WAL, shared by both processes) and on a real PostgreSQL.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from broker_support import (
    Collector,
    Mosquitto,
    app_config,
    appliance_child,
    mosquitto_fixture,  # noqa: F401
    publish,
    wait_until,
)
from collector_support import (
    PostgresServer,
    collector_child,
    database_url,  # noqa: F401
    make_result,
    postgres_server,  # noqa: F401
)
from sqlalchemy import select

from deploy.broker import free_port
from deploy.collector.config import load_collector_config
from deploy.collector.db import open_engine
from deploy.collector.service import ArchiveService
from deploy.collector.tables import results
from deploy.messages.testing import status_message

SLIDES = 30


def stored_ids(db_url: str) -> list[str]:
    engine = open_engine(db_url, writer=False)
    try:
        with engine.connect() as conn:
            return [r[0] for r in conn.execute(select(results.c.message_id))]
    finally:
        engine.dispose()


def subscribed(broker: Mosquitto, client_id: str, times: int = 1) -> bool:
    return broker.log_text().count(f"Received SUBSCRIBE from {client_id}") >= times


class Children:
    """Processes started by a test, killed (by pid) at the end."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[str]] = []

    def add(self, proc: subprocess.Popen[str]) -> subprocess.Popen[str]:
        self.procs.append(proc)
        return proc

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


@pytest.fixture
def children() -> Iterator[Children]:
    kids = Children()
    yield kids
    kids.close()


@pytest.mark.slow
def test_two_collectors_store_every_result_once_across_a_sigkill(
    mosquitto: Mosquitto, db_url: str, tmp_path: Path, children: Children
) -> None:
    def start(client_id: str) -> subprocess.Popen[str]:
        return children.add(collector_child(mosquitto.url, db_url, client_id, tmp_path / "state"))

    first, second = start("archive-a"), start("archive-b")
    assert wait_until(
        lambda: subscribed(mosquitto, "archive-a") and subscribed(mosquitto, "archive-b"), 30
    ), (first.poll(), second.poll(), mosquitto.log_text()[-1500:])
    with Collector(mosquitto.port, "omis/v1/+/result", client_id="witness") as witness:
        slides = [f"K-{i:03d}" for i in range(SLIDES)]
        config = app_config(mosquitto.url, device="scope-07")
        appliance = children.add(appliance_child(config, tmp_path / "dev", slides, delay_s=0.05))
        assert appliance.stdout is not None
        assert appliance.stdout.readline().strip() == "READY"
        assert wait_until(lambda: len(witness.unique_results()) >= SLIDES // 3, 60)
        os.kill(first.pid, signal.SIGKILL)  # mid-scan: some results are in flight to it
        first.wait(10)
        assert wait_until(lambda: len(witness.unique_results()) == SLIDES, 120)
        restarted = start("archive-a")  # its session (and what was queued for it) is kept
        assert wait_until(lambda: subscribed(mosquitto, "archive-a", 2), 30)
        sent = set(witness.unique_results())
        assert wait_until(lambda: len(stored_ids(db_url)) >= SLIDES, 60), len(stored_ids(db_url))
    ids = stored_ids(db_url)
    assert len(ids) == len(set(ids)) == SLIDES
    assert set(ids) == sent
    assert restarted.poll() is None and second.poll() is None


def test_collector_keeps_live_state_alerts_and_skips_malformed(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    prefix = "omis/v1/scope-07"
    publish(mosquitto.port, f"{prefix}/availability", "online", retain=True)
    publish(mosquitto.port, f"{prefix}/status", json.dumps(_status("idle")), retain=True)
    config = load_collector_config(
        environ={},
        overrides={
            "mqtt": {"broker": mosquitto.url, "client_id": "archive-x"},
            "http": {"port": free_port()},
        },
    )
    service = ArchiveService(config, tmp_path / "state")
    stop = threading.Event()
    service.start()
    runner = threading.Thread(target=service.run, args=(stop,))
    runner.start()
    try:
        api = httpx.Client(base_url=service.http_url, timeout=10)
        assert wait_until(lambda: _devices(api) == ["scope-07"], 20)
        assert api.get("/api/devices").json()[0]["status"]["state"] == "idle"
        publish(mosquitto.port, f"{prefix}/result", b"{not json")  # acknowledged, skipped
        publish(mosquitto.port, "omis/v1/.bad/result", b"{}")  # not a device id (leading dot)
        good = make_result(1, p_high=0.97)
        publish(mosquitto.port, f"{prefix}/result", json.dumps(good))
        publish(mosquitto.port, f"{prefix}/result", json.dumps(good))  # redelivery
        publish(mosquitto.port, f"{prefix}/result", json.dumps(make_result(3)))
        assert wait_until(lambda: api.get("/api/results").json()["total"] == 2, 20)
        assert service.subscriber is not None
        assert wait_until(lambda: service.subscriber.rejected == 2, 10)  # both set aside
        publish(mosquitto.port, f"{prefix}/availability", "offline", retain=True)
        expected = ["high_risk", "offline", "rejected", "rejected", "seq_gap"]
        assert wait_until(lambda: sorted(_open_kinds(api)) == expected, 20)
        for leaf in ("availability", "status", "ota/state"):  # decommissioning (docs/scale.md)
            publish(mosquitto.port, f"{prefix}/{leaf}", "", retain=True)
        assert wait_until(lambda: _devices(api) == [], 20)
        assert api.get("/api/results", params={"device": "scope-07"}).json()["total"] == 2
    finally:
        stop.set()
        runner.join(10)
        service.close()


def _status(state: str) -> dict[str, Any]:
    return status_message(state).to_json()


def _devices(api: httpx.Client) -> list[str]:
    return [d["device_id"] for d in api.get("/api/devices").json()]


def _open_kinds(api: httpx.Client) -> list[str]:
    return [a["kind"] for a in api.get("/api/alerts", params={"open": True}).json()]


def test_nothing_is_acknowledged_while_the_database_is_down(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    server = PostgresServer().start()
    config = load_collector_config(
        environ={},
        overrides={
            "mqtt": {"broker": mosquitto.url, "client_id": "archive-pg", "reconnect_max_s": 2},
            "database": {"url": server.new_database()},
            "http": {"port": free_port()},
        },
    )
    service = ArchiveService(config, tmp_path / "state")
    stop = threading.Event()
    runner = threading.Thread(target=service.run, args=(stop,))
    try:
        service.start()
        runner.start()
        subscriber = service.subscriber
        assert subscriber is not None and subscriber.subscribed.wait(10)
        api = httpx.Client(base_url=service.http_url, timeout=30)
        first, second = make_result(1), make_result(2)
        publish(mosquitto.port, "omis/v1/scope-07/result", json.dumps(first))
        assert wait_until(lambda: subscriber.stored == 1, 20)
        server.halt()
        publish(mosquitto.port, "omis/v1/scope-07/result", json.dumps(second))
        assert wait_until(lambda: subscriber.storage_errors > 0, 30)  # retried, no PUBACK
        server.launch()
        # The broker redelivers the unacknowledged result after the collector reconnects.
        assert wait_until(lambda: subscriber.stored == 2, 60), mosquitto.log_text()[-1500:]
        ids = {r["message_id"] for r in api.get("/api/results").json()["items"]}
        assert ids == {first["message_id"], second["message_id"]}
    finally:
        stop.set()
        if runner.is_alive():
            runner.join(10)
        service.close()
        server.stop()
