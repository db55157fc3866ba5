"""Staged rollouts: waves, halting, resuming and refusing, on SQLite and PostgreSQL.

The rollout logic runs against a scripted offerer (each device answers as told); the real
MQTT path with appliance processes is in ``test_fleet_mqtt.py``.
"""

from __future__ import annotations

import subprocess
import sys
import threading

import pytest
from collector_support import database_url, postgres_server  # noqa: F401

from deploy.collector.db import migrate, open_engine
from deploy.exceptions import FleetError
from deploy.fleet.rollout import DeviceOutcome, RolloutRunner
from deploy.fleet.store import BundleRef, FleetStore, plan_waves

BUNDLE = BundleRef("ab" * 32, "tiny", 7)


class ScriptedOfferer:
    """Answers each device's offer as scripted (default: committed); records the calls."""

    def __init__(self, script: dict[str, DeviceOutcome] | None = None) -> None:
        self.script = script or {}
        self.offered: list[str] = []
        self.versions: dict[str, int] = {}
        self.lock = threading.Lock()

    def current_version(self, device_id: str) -> int | None:
        return self.versions.get(device_id)

    def offer(self, device_id: str) -> DeviceOutcome:
        with self.lock:
            self.offered.append(device_id)
        outcome = self.script.get(device_id, DeviceOutcome("committed", BUNDLE.version))
        if outcome.step == "committed":
            self.versions[device_id] = BUNDLE.version
        return outcome


class Exploding(ScriptedOfferer):
    def offer(self, device_id: str) -> DeviceOutcome:
        raise RuntimeError(f"{device_id}: broker vanished")


@pytest.fixture
def store(db_url: str) -> FleetStore:
    engine = open_engine(db_url)
    migrate(engine)
    return FleetStore(engine)


def start(store: FleetStore, devices: list[str], canary: int = 1, wave: int = 0) -> int:
    waves = plan_waves(devices, canary, wave)
    record, resumed = store.begin_rollout(BUNDLE, {"devices": devices}, waves, canary, wave)
    assert not resumed
    return record.id


def steps(store: FleetStore, rollout_id: int) -> dict[str, str]:
    return {d.device_id: d.step for d in store.rollout(rollout_id).devices}


# -- planning ---------------------------------------------------------------------------------


def test_waves_put_the_canary_first_then_the_rest_in_waves() -> None:
    assert plan_waves(["a", "b", "c", "d", "e"], 1, 0) == [["a"], ["b", "c", "d", "e"]]
    assert plan_waves(["a", "b", "c", "d", "e"], 2, 2) == [["a", "b"], ["c", "d"], ["e"]]
    assert plan_waves(["a"], 3, 0) == [["a"]]


@pytest.mark.parametrize(
    ("devices", "canary", "wave", "message"),
    [
        ([], 1, 0, "at least one device"),
        (["a", "b", "a"], 1, 0, "listed twice: a"),
        (["a"], 0, 0, "--canary"),
        (["a", "b"], 1, -1, "--wave-size"),
    ],
)
def test_bad_plans_are_refused(devices: list[str], canary: int, wave: int, message: str) -> None:
    with pytest.raises(FleetError, match=message):
        plan_waves(devices, canary, wave)


# -- groups -----------------------------------------------------------------------------------


def test_groups_are_kept_and_an_unknown_group_is_refused(store: FleetStore) -> None:
    assert store.add_to_group("ward-3", ["scope-1", "scope.2", "scope-1"]) == 2
    assert store.add_to_group("ward-3", ["scope-1", "scope-3"]) == 1
    assert store.group_devices("ward-3") == ["scope-1", "scope-3", "scope.2"]
    with pytest.raises(FleetError, match="unknown group 'ward-9'"):
        store.group_devices("ward-9")
    assert store.remove_from_group("ward-3", ["scope-3"]) == 1
    assert store.remove_from_group("ward-3") == 2
    with pytest.raises(FleetError, match="unknown group"):
        store.group_devices("ward-3")


@pytest.mark.parametrize("bad", ["../etc", "a b", "", "x" * 65, "scope\x00"])
def test_group_and_device_names_follow_the_identifier_rule(store: FleetStore, bad: str) -> None:
    with pytest.raises(FleetError, match="not a valid id"):
        store.add_to_group(bad, ["scope-1"])
    with pytest.raises(FleetError, match="not a valid id"):
        store.add_to_group("ok", [bad])
    assert store.groups() == {}


# -- running ----------------------------------------------------------------------------------


def test_a_good_rollout_reaches_every_device_wave_by_wave(store: FleetStore) -> None:
    rid = start(store, ["d1", "d2", "d3"], canary=1, wave=1)
    offerer = ScriptedOfferer()
    result = RolloutRunner(store, offerer, heartbeat_s=0.05).run(rid)
    assert not result.halted
    assert offerer.offered[0] == "d1"
    assert sorted(offerer.offered) == ["d1", "d2", "d3"]
    assert steps(store, rid) == {"d1": "committed", "d2": "committed", "d3": "committed"}
    assert result.record.state == "completed"
    assert result.record.as_json()["counts"]["committed"] == 3


@pytest.mark.parametrize("failure", ["rejected", "rolled_back", "timeout"])
def test_a_failing_canary_halts_and_leaves_the_rest_untouched(
    store: FleetStore, failure: str
) -> None:
    rid = start(store, ["d1", "d2", "d3"], canary=1)
    offerer = ScriptedOfferer({"d1": DeviceOutcome(failure, 6, "golden gate failed")})
    result = RolloutRunner(store, offerer).run(rid)
    assert result.halted
    assert result.reason == f"halted in wave 0: d1 {failure} (golden gate failed)"
    assert offerer.offered == ["d1"]
    assert steps(store, rid) == {"d1": failure, "d2": "pending", "d3": "pending"}
    assert store.rollout(rid).state == "halted"


def test_an_offer_that_raises_halts_with_the_reason(store: FleetStore) -> None:
    rid = start(store, ["d1", "d2"])
    result = RolloutRunner(store, Exploding()).run(rid)
    assert result.halted
    assert "d1 timeout (offer failed: d1: broker vanished)" in str(result.reason)
    assert steps(store, rid)["d2"] == "pending"


def test_a_failure_in_a_later_wave_stops_the_waves_after_it(store: FleetStore) -> None:
    rid = start(store, ["d1", "d2", "d3", "d4"], canary=1, wave=1)
    offerer = ScriptedOfferer({"d3": DeviceOutcome("rolled_back", 6, "3 abstained")})
    result = RolloutRunner(store, offerer).run(rid)
    assert result.halted
    assert steps(store, rid) == {
        "d1": "committed",
        "d2": "committed",
        "d3": "rolled_back",
        "d4": "pending",
    }


# -- resuming and refusing --------------------------------------------------------------------


def test_an_interrupted_rollout_resumes_where_it_stopped(store: FleetStore) -> None:
    devices = ["d1", "d2", "d3"]
    rid = start(store, devices, canary=1)
    # A command was killed: d1 committed, d2 offered (and meanwhile committed), d3 not reached.
    store.set_step(rid, "d1", "committed", version=7)
    store.set_step(rid, "d2", "offered")
    with store.engine.begin() as conn:  # its owner is a process that no longer exists
        from deploy.collector.tables import rollouts

        conn.execute(rollouts.update().values(owner=f"{_host()}:{_dead_pid()}"))
    offerer = ScriptedOfferer()
    offerer.versions["d2"] = 7
    record, resumed = store.begin_rollout(
        BUNDLE, {"devices": devices}, plan_waves(devices, 1, 0), 1, 0
    )
    assert resumed
    assert record.id == rid
    result = RolloutRunner(store, offerer).run(rid)
    assert not result.halted
    assert offerer.offered == ["d3"]  # d1 skipped, d2 found already serving v7
    assert steps(store, rid) == {"d1": "committed", "d2": "committed", "d3": "committed"}
    assert store.count() == 1


def test_a_second_rollout_of_the_same_bundle_is_refused_while_one_runs(
    store: FleetStore,
) -> None:
    devices = ["d1", "d2"]
    rid = start(store, devices)
    with store.engine.begin() as conn:  # driven by a live process (our parent)
        from deploy.collector.tables import rollouts

        conn.execute(rollouts.update().values(owner=f"{_host()}:{_live_pid()}"))
    with pytest.raises(FleetError, match=f"rollout {rid} of this bundle is already running"):
        store.begin_rollout(BUNDLE, {"devices": devices}, plan_waves(devices, 1, 0), 1, 0)
    assert store.count() == 1
    assert set(steps(store, rid).values()) == {"pending"}


def test_resuming_with_other_devices_is_refused(store: FleetStore) -> None:
    rid = start(store, ["d1", "d2"])
    with store.engine.begin() as conn:
        from deploy.collector.tables import rollouts

        conn.execute(rollouts.update().values(owner=f"{_host()}:{_dead_pid()}"))
    with pytest.raises(FleetError, match="interrupted with other devices"):
        store.begin_rollout(BUNDLE, {"devices": ["d1"]}, [["d1"]], 1, 0)
    assert steps(store, rid) == {"d1": "pending", "d2": "pending"}


def test_a_finished_rollout_frees_its_bundle_for_a_new_one(store: FleetStore) -> None:
    rid = start(store, ["d1"])
    RolloutRunner(store, ScriptedOfferer({"d1": DeviceOutcome("rejected", 6, "x")})).run(rid)
    again = start(store, ["d1"])
    assert again != rid
    assert [r.state for r in store.rollouts()] == ["running", "halted"]


def _host() -> str:
    import socket

    return socket.gethostname()


def _live_pid() -> int:
    import os

    return os.getppid()


def _dead_pid() -> int:
    proc = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        check=True,
        capture_output=True,
        text=True,
    )
    return int(proc.stdout)
