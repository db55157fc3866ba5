"""``omis fleet rollout --shadow-first``: three ``omis serve`` processes, a real mosquitto, the
real collector archiving shadow results, and the rollout command reading them.

A candidate goes to shadow on the canary, is compared on its simulated slides (scanned over
``cmd/scan`` while the canary still serves v1), is promoted through the normal health period
and then reaches the other two devices in the second wave.  A candidate failing its golden gate
in shadow mode halts the rollout after the canary, the others untouched.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from broker_support import Collector, Mosquitto, publish, wait_until
from sqlalchemy import select
from test_fleet_mqtt import DEVICES, Fleet, current, finish, offers

from deploy.broker import find_mosquitto, free_port
from deploy.collector.config import load_collector_config
from deploy.collector.db import open_engine
from deploy.collector.service import ArchiveService
from deploy.collector.tables import results, shadow_results

pytestmark = [
    pytest.mark.skipif(find_mosquitto() is None, reason="mosquitto is not installed"),
    pytest.mark.slow,
]

SLIDES = 3
URLS: dict[str, str] = {}


def _fleet_view(device: str) -> dict[str, Any]:
    response = httpx.Client(base_url=URLS["api"], timeout=10).get("/api/devices")
    assert response.status_code == 200, response.text[:500]
    return next(r["fleet"] for r in response.json() if r["device_id"] == device)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Fleet, Collector]]:
    root = tmp_path_factory.mktemp("fleet-shadow")
    broker = Mosquitto(root).start()
    fleet = Fleet(root, broker)
    config = load_collector_config(
        environ={},
        overrides={
            "database": {"url": fleet.db},
            "mqtt": {"broker": broker.url, "client_id": "archive-fleet"},
            "http": {"port": free_port()},
        },
    )
    archive = ArchiveService(config, root / "archive-state")
    stop = threading.Event()
    runner = threading.Thread(target=archive.run, args=(stop,))
    try:
        archive.start()
        runner.start()
        with Collector(broker.port, "omis/v1/#") as col:
            fleet.start()
            assert wait_until(lambda: all(current(col, d) == 1 for d in DEVICES), 120)
            URLS["api"] = archive.http_url
            yield fleet, col
    finally:
        fleet.stop()
        stop.set()
        runner.join(10)
        archive.close()
        broker.stop()


def _step(f: Fleet, device: str) -> str | None:
    rollouts = f.store().rollouts(1)
    if not rollouts:
        return None
    steps = {d.device_id: d.step for d in rollouts[0].devices}
    return steps.get(device)


def _rows(f: Fleet, table: Any) -> list[Any]:
    engine = open_engine(f.db, writer=False)
    try:
        with engine.connect() as conn:
            return list(conn.execute(select(table)).mappings())
    finally:
        engine.dispose()


def test_a_candidate_goes_to_shadow_is_compared_promoted_then_rolled_out(
    fleet: tuple[Fleet, Collector],
) -> None:
    f, col = fleet
    args = ("--devices", ",".join(DEVICES), "--canary", "1", "--shadow-first", str(SLIDES))
    proc = f.rollout("v2.tar", *args, "--min-agreement", "0")
    assert wait_until(lambda: _step(f, "fleet-a") == "shadow", 120), proc.stderr
    shadow = col.json_on("/fleet-a/ota/state")[-1]["shadow"]
    assert shadow["version"] == 2 and current(col, "fleet-a") == 1
    assert wait_until(lambda: _fleet_view("fleet-a")["shadow_version"] == 2, 10)
    assert _fleet_view("fleet-a")["rollout"]["step"] == "shadow"
    for i in range(SLIDES):
        publish(f.broker.port, "omis/v1/fleet-a/cmd/scan", json.dumps({"slide_id": f"sh-{i}"}))
    code, record, err = finish(proc)
    assert code == 0, err
    assert record["state"] == "completed", record
    waves = [[(d["device_id"], d["step"], d["version"]) for d in w] for w in record["waves"]]
    assert waves == [
        [("fleet-a", "committed", 2)],
        [("fleet-b", "committed", 2), ("fleet.c", "committed", 2)],
    ]
    assert wait_until(lambda: all(current(col, d) == 2 for d in DEVICES), 10)
    assert col.json_on("/fleet-a/ota/state")[-1]["shadow"] is None
    shadows = _rows(f, shadow_results)
    assert len(shadows) == SLIDES and {s["device_id"] for s in shadows} == {"fleet-a"}
    assert all(s["candidate_version"] == 2 for s in shadows)
    served = {r["message_id"]: r for r in _rows(f, results)}
    # Each compared slide was served (and archived) by v1: the shadow never served.
    assert all(served[s["serving_message_id"]]["model_version"] == 1 for s in shadows)


def test_a_shadow_candidate_failing_its_gate_halts_after_the_canary(
    fleet: tuple[Fleet, Collector],
) -> None:
    f, col = fleet
    before = {d: offers(col, d) for d in DEVICES}
    code, record, err = finish(
        f.rollout("bad3.tar", "--devices", ",".join(DEVICES), "--shadow-first", "2")
    )
    assert code == 1, err
    assert record["state"] == "halted"
    assert record["reason"].startswith("halted in wave 0: fleet-a rejected"), record["reason"]
    steps = {d["device_id"]: d["step"] for w in record["waves"] for d in w}
    assert steps == {"fleet-a": "rejected", "fleet-b": "pending", "fleet.c": "pending"}
    assert offers(col, "fleet-b") == before["fleet-b"]
    assert col.json_on("/fleet-a/ota/state")[-1]["shadow"] is None
    assert all(current(col, d) == 2 for d in DEVICES)
