"""A fleet of three ``omis serve`` processes, a real mosquitto, and ``omis fleet rollout``.

One module-scoped fleet takes three rollouts in turn: a good bundle reaches every device
(canary, then the second wave); a bundle that fails its golden gate halts after the canary with
the other devices untouched; a rollout whose command is killed after the canary committed
resumes without offering the canary again.  A device that never answers halts a rollout
within seconds.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from broker_support import Collector, Mosquitto, wait_until
from ota_support import make_bundle

from deploy.broker import find_mosquitto
from deploy.collector.db import open_engine
from deploy.fleet.store import FleetStore
from deploy.ota import GoldenGate, Installer, ModelStore, TrustStore
from deploy.ota.signing import generate_keypair
from deploy.ota.unpack import pack_bundle

pytestmark = [
    pytest.mark.skipif(find_mosquitto() is None, reason="mosquitto is not installed"),
    pytest.mark.slow,
]

OMIS = [sys.executable, "-m", "deploy.cli"]
DEVICES = ("fleet-a", "fleet-b", "fleet.c")
# Commit an update after 2 s of passing health checks (no slides are scanned here).
FAST_HEALTH = {
    "OMIS_OTA__HEALTH_SECONDS": "2",
    "OMIS_OTA__HEALTH_SLIDES": "1000",
    "OMIS_OTA__HEALTH_CHECK_INTERVAL_S": "0.2",
    "OMIS_SERVICE__HEALTH_INTERVAL_S": "0.5",
    "OMIS_SCAN__SCAN_ON_INSERT": "false",
}


class Fleet:
    """Three appliance processes on one broker, each with v1 installed."""

    def __init__(self, root: Path, broker: Mosquitto) -> None:
        self.root = root
        self.broker = broker
        keys = generate_keypair(root / "keys", "fleet")
        self.key = keys.private
        self.bundles: dict[str, Path] = {}
        for name, version, bad in (("v1", 1, False), ("v2", 2, False), ("bad3", 3, True)):
            self._bundle(name, version, bad)
        self._bundle("v4", 4, False)
        self.states: dict[str, Path] = {}
        for device in DEVICES:
            state = root / device
            TrustStore(state).add(keys.public)
            gate = GoldenGate(state_dir=state)
            Installer(ModelStore(state), TrustStore(state), gate).install(self.bundles["v1"])
            self.states[device] = state
        self.db = f"sqlite:///{root / 'archive.sqlite'}"
        self.procs: list[subprocess.Popen[bytes]] = []

    def _bundle(self, name: str, version: int, bad: bool) -> None:
        root = make_bundle(self.root / name, version, key=self.key, bad_golden=bad)
        self.bundles[name] = root
        self.bundles[f"{name}.tar"] = pack_bundle(root, self.root / f"{name}.tar")

    def start(self) -> None:
        for device in DEVICES:
            cmd = [*OMIS, "serve", "--microscope", "sim://", "--broker", self.broker.url]
            cmd += ["--device-id", device, "--fields", "2", "--state-dir", str(self.states[device])]
            self.procs.append(
                subprocess.Popen(
                    cmd,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                    env={**os.environ, **FAST_HEALTH},
                )
            )

    def stop(self) -> None:
        for proc in self.procs:
            proc.terminate()
        for proc in self.procs:
            proc.wait(30)

    def rollout(self, bundle: str, *extra: str) -> subprocess.Popen[str]:
        cmd = [*OMIS, "fleet", "rollout", "--bundle", str(self.bundles[bundle]), "--json"]
        cmd += ["--broker", self.broker.url, "--db", self.db, "--state-wait", "3"]
        cmd += ["--outcome-wait", "90", *extra]
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def store(self) -> FleetStore:
        return FleetStore(open_engine(self.db))


def current(col: Collector, device: str) -> int | None:
    states = col.json_on(f"/{device}/ota/state")
    return states[-1].get("current") if states else None


def offers(col: Collector, device: str) -> int:
    return len(col.on(f"/{device}/cmd/ota"))


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Fleet, Collector]]:
    root = tmp_path_factory.mktemp("fleet")
    broker = Mosquitto(root).start()
    fleet = Fleet(root, broker)
    try:
        with Collector(broker.port, "omis/v1/#") as col:
            fleet.start()
            assert wait_until(lambda: all(current(col, d) == 1 for d in DEVICES), 120), [
                current(col, d) for d in DEVICES
            ]
            yield fleet, col
    finally:
        fleet.stop()
        broker.stop()


def finish(proc: subprocess.Popen[str]) -> tuple[int, dict[str, Any], str]:
    out, err = proc.communicate(timeout=300)
    return proc.returncode, json.loads(out) if out.strip() else {}, err


def test_a_good_bundle_reaches_the_canary_then_the_second_wave(
    fleet: tuple[Fleet, Collector],
) -> None:
    f, col = fleet
    code, record, err = finish(f.rollout("v2.tar", "--devices", ",".join(DEVICES), "--canary", "1"))
    assert code == 0, err
    assert record["state"] == "completed"
    assert [[d["device_id"] for d in wave] for wave in record["waves"]] == [
        ["fleet-a"],
        ["fleet-b", "fleet.c"],
    ]
    assert all(d["step"] == "committed" and d["version"] == 2 for w in record["waves"] for d in w)
    assert wait_until(lambda: all(current(col, d) == 2 for d in DEVICES), 10)
    status = subprocess.run(
        [*OMIS, "fleet", "status", "--db", f.db, "--json"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert json.loads(status.stdout)[0]["counts"]["committed"] == 3


def test_a_bundle_failing_its_gate_halts_after_the_canary(
    fleet: tuple[Fleet, Collector],
) -> None:
    f, col = fleet
    before = {d: offers(col, d) for d in DEVICES}
    code, record, err = finish(f.rollout("bad3.tar", "--devices", ",".join(DEVICES)))
    assert code == 1, err
    assert record["state"] == "halted"
    assert record["reason"].startswith("halted in wave 0: fleet-a rejected"), record["reason"]
    steps = {d["device_id"]: d["step"] for w in record["waves"] for d in w}
    assert steps == {"fleet-a": "rejected", "fleet-b": "pending", "fleet.c": "pending"}
    assert offers(col, "fleet-b") == before["fleet-b"]  # never offered
    assert offers(col, "fleet.c") == before["fleet.c"]
    assert all(current(col, d) == 2 for d in DEVICES)


def test_a_killed_rollout_resumes_without_offering_the_canary_again(
    fleet: tuple[Fleet, Collector],
) -> None:
    f, col = fleet
    f.store().add_to_group("ward", list(DEVICES))
    proc = f.rollout("v4.tar", "--group", "ward", "--canary", "1")

    def canary_done() -> bool:
        rollouts = f.store().rollouts(1)
        return bool(rollouts) and rollouts[0].waves()[0][0].step == "committed"

    assert wait_until(canary_done, 120)
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    offered = offers(col, "fleet-a")
    code, record, err = finish(f.rollout("v4.tar", "--group", "ward", "--canary", "1"))
    assert code == 0, err
    assert "(resumed)" in err
    assert record["state"] == "completed"
    assert offers(col, "fleet-a") == offered
    assert wait_until(lambda: all(current(col, d) == 4 for d in DEVICES), 10)
    assert len(f.store().rollouts(10)) == 3


def test_a_device_that_never_answers_halts_within_seconds(
    fleet: tuple[Fleet, Collector],
) -> None:
    f, _ = fleet
    code, record, err = finish(f.rollout("v4.tar", "--devices", "ghost-1,fleet-a"))
    assert code == 1, err
    assert "ghost-1 timeout (no ota/state from ghost-1 within 3 s" in record["reason"]
    steps = {d["device_id"]: d["step"] for w in record["waves"] for d in w}
    assert steps == {"ghost-1": "timeout", "fleet-a": "pending"}


def test_an_unknown_group_is_refused_with_one_line(fleet: tuple[Fleet, Collector]) -> None:
    f, _ = fleet
    code, record, err = finish(f.rollout("v4.tar", "--group", "nowhere"))
    assert code == 1
    assert record == {}
    assert (
        err.strip()
        .splitlines()[-1]
        .endswith("unknown group 'nowhere' (omis fleet group add nowhere DEVICE...)")
    )
