"""What the lab sees of the fleet: OTA outcomes from ota/state, /api/devices and /api/fleet."""

from __future__ import annotations

from typing import Any

import pytest
from collector_support import database_url, postgres_server  # noqa: F401
from fastapi.testclient import TestClient

from deploy.collector.api import create_app
from deploy.collector.config import HttpConfig
from deploy.collector.db import migrate, open_engine
from deploy.collector.queries import ArchiveQueries
from deploy.collector.store import ArchiveStore
from deploy.fleet.rollout import DeviceOutcome, RolloutRunner
from deploy.fleet.store import BundleRef, FleetStore, plan_waves
from deploy.messages.testing import ota_state_message


def ota_state(current: int, step: str | None, cid: str = "c1", **extra: Any) -> dict[str, Any]:
    progress = None if step is None else {"step": step, "correlation_id": cid, **extra}
    last = {"result": "committed", "version": current}
    return ota_state_message(current, 1, last_outcome=last, progress=progress).to_json()


@pytest.fixture
def archive(db_url: str) -> tuple[ArchiveStore, TestClient]:
    engine = open_engine(db_url)
    migrate(engine)
    app = create_app(ArchiveQueries(engine), HttpConfig(require_auth_on_localhost=False), None)
    return ArchiveStore(engine), TestClient(
        app, base_url="http://localhost", client=("127.0.0.1", 5000)
    )


def test_outcomes_are_counted_once_and_a_rollback_raises_an_alert(
    archive: tuple[ArchiveStore, TestClient],
) -> None:
    store, api = archive
    store.set_ota_state("scope-1", ota_state(2, "health", version=2))
    for _ in range(3):  # the retained copy again, and a second archive instance's write
        store.set_ota_state("scope-1", ota_state(2, "committed", version=2))
    store.set_ota_state("scope-1", ota_state(2, "rolled_back", cid="c2", version=3, reason="NaN"))
    store.set_ota_state("scope-1", ota_state(2, "rolled_back", cid="c2", version=3, reason="NaN"))
    store.set_ota_state("scope-2", ota_state(1, "rejected", cid="c3", version=3))
    devices = {d["device_id"]: d["fleet"] for d in api.get("/api/devices").json()}
    assert devices["scope-1"]["commits"] == 1
    assert devices["scope-1"]["rollbacks"] == 1
    assert devices["scope-1"]["serving_version"] == 2
    assert devices["scope-1"]["ota_step"] == "rolled_back"
    assert devices["scope-2"]["rejections"] == 1
    assert devices["scope-2"]["rollbacks"] == 0
    alerts = api.get("/api/alerts").json()
    rollbacks = [a for a in alerts if a["kind"] == "rollback"]
    assert len(rollbacks) == 1
    assert rollbacks[0]["detail"] == "scope-1 rolled back model version 3: NaN"
    # the alert list filters by every kind an alert is raised with, fleet's too
    filtered = api.get("/api/alerts", params={"kind": "rollback"})
    assert filtered.status_code == 200, filtered.text
    assert [a["id"] for a in filtered.json()] == [rollbacks[0]["id"]]


@pytest.mark.parametrize(
    "progress",
    [
        {"step": "committed"},  # no correlation id
        {"step": "committed", "correlation_id": 7},
        {"step": "committed", "correlation_id": "c", "version": 2**70},
        {"step": "committed", "correlation_id": "c", "version": True},
        {"step": ["committed"], "correlation_id": "c"},  # unhashable: not a step
        {"step": {"x": 1}, "correlation_id": "c"},
        "committed",
        None,
    ],
)
def test_odd_progress_never_breaks_the_state_write(
    archive: tuple[ArchiveStore, TestClient], progress: Any
) -> None:
    store, api = archive
    state = {**ota_state(2, None), "progress": progress}
    store.set_ota_state("scope-1", state)
    (device,) = api.get("/api/devices").json()
    assert device["fleet"]["serving_version"] == 2
    assert device["fleet"]["commits"] in (0, 1)


def test_rollouts_and_groups_are_served(archive: tuple[ArchiveStore, TestClient]) -> None:
    store, api = archive
    fleet = FleetStore(store.engine)
    fleet.add_to_group("ward", ["scope-1", "scope-2"])
    waves = plan_waves(["scope-1", "scope-2"], 1, 0)
    record, _ = fleet.begin_rollout(BundleRef("cd" * 32, "tiny", 5), {"group": "ward"}, waves, 1, 0)

    class Offerer:
        def current_version(self, device_id: str) -> int | None:
            return None

        def offer(self, device_id: str) -> DeviceOutcome:
            return DeviceOutcome("committed", 5)

    RolloutRunner(fleet, Offerer()).run(record.id)
    store.set_ota_state("scope-1", ota_state(5, None))
    listed = api.get("/api/fleet/rollouts")
    assert listed.status_code == 200, listed.text
    (rollout,) = listed.json()
    assert rollout["state"] == "completed"
    assert rollout["counts"]["committed"] == 2
    assert api.get(f"/api/fleet/rollouts/{record.id}").json()["id"] == record.id
    assert api.get("/api/fleet/rollouts/999").status_code == 404
    assert api.get("/api/fleet/rollouts/0").status_code == 422
    assert api.get("/api/fleet/groups").json() == {"ward": ["scope-1", "scope-2"]}
    (device,) = api.get("/api/devices").json()
    assert device["fleet"]["groups"] == ["ward"]
    assert device["fleet"]["rollout"] == {
        "id": record.id,
        "state": "completed",
        "version": 5,
        "wave": 0,
        "step": "committed",
    }
