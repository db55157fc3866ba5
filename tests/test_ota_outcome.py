"""``omis ota publish`` reports the device's final outcome, and ``ota/state`` never goes stale.

A real mosquitto, an in-process appliance with the real sim:// scanner following its model
store, and ``omis ota publish`` as a real subprocess.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from broker_support import (
    Collector,
    Mosquitto,
    app_config,
    mosquitto_fixture,  # noqa: F401 - the "mosquitto" fixture
    running_appliance,
    wait_appliance_ready,
    wait_until,
)
from fakes.bundles import make_bundle
from ota_support import resigned, set_key

from deploy.appliance.ota import OtaSettings
from deploy.appliance.service import Appliance
from deploy.broker import find_mosquitto
from deploy.config import load_config
from deploy.ota import GoldenGate, HealthPolicy, Installer, ModelStore, TrustStore
from deploy.ota.exceptions import HealthCheckError
from deploy.ota.signing import generate_keypair, sign_bundle
from deploy.ota.unpack import pack_bundle
from deploy.scanner import MicroscopeScanner

pytestmark = pytest.mark.skipif(find_mosquitto() is None, reason="mosquitto is not installed")

DEVICE = "out1"
BASE = f"omis/v1/{DEVICE}"
FAST = HealthPolicy(slides=2, seconds=2.0, check_interval_s=0.1)


@pytest.fixture(scope="module")
def kit(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("outcome")
    key = generate_keypair(d / "keys", "fleet")
    out = {"pub": key.public}
    bundles = {
        "v1": make_bundle(d / "v1", seed=1, version=1),
        "v2": make_bundle(d / "v2", seed=2, version=2),
        "bad": make_bundle(d / "bad", seed=3, version=2, golden_offset=0.5),
        "nan": make_bundle(d / "nan", seed=4, version=2),
    }
    # Preprocessing that overflows to infinity: the tensor-level gate alone passed this one.
    raw = json.loads((d / "nan" / "manifest.json").read_bytes())
    raw["input"]["normalization"]["std"] = [0.2, 1e-39, 0.2]
    (d / "nan" / "manifest.json").write_text(json.dumps(raw))
    for name, bundle in bundles.items():
        sign_bundle(bundle.root, key.private)
        out[name] = bundle.root
        out[f"{name}.tar"] = pack_bundle(bundle.root, d / f"{name}.tar")
    # Correctly signed, yet malformed: a pickled golden array, and a version that is a string.
    odd = {
        "pickled": resigned(make_bundle(d / "pickled", seed=5, version=2).root, key.private, _pkl),
        "string-version": resigned(
            make_bundle(d / "sv", seed=6, version=2).root, key.private, set_key("version", "2")
        ),
    }
    for name, root in odd.items():
        out[f"{name}.tar"] = pack_bundle(root, d / f"{name}.tar")
    return out


def _pkl(root: Path, raw: dict[str, Any]) -> None:
    np.save(root / "golden" / "outputs.npy", np.array([{"x": 1}], dtype=object), allow_pickle=True)


@contextlib.contextmanager
def running(broker: Mosquitto, state: Path, settings: OtaSettings) -> Iterator[Appliance]:
    config = app_config(
        broker.url, DEVICE, scan={"microscope": "sim://", "fields": 2, "scan_on_insert": False}
    )
    scanner = MicroscopeScanner("sim://", None, state, sim_size=(64, 48))
    app = Appliance(load_config(environ={}, overrides=config), state, scanner, settings)
    with running_appliance(app):
        wait_appliance_ready(broker.port, app)
        yield app


def _device(tmp_path: Path, kit: dict[str, Path]) -> Path:
    state = tmp_path / "state"
    TrustStore(state).add(kit["pub"])
    Installer(ModelStore(state), TrustStore(state), GoldenGate(state_dir=state)).install(kit["v1"])
    return state


def _publish(broker: Mosquitto, tar: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            *(sys.executable, "-m", "deploy.cli", "ota", "publish", str(tar)),
            *("--broker", broker.url, "--device-id", DEVICE, "--inline", "--wait", "60", "--json"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def _failing_check() -> None:
    raise HealthCheckError("firmware handshake failed")


def _last_state(col: Collector) -> dict[str, Any]:
    states = col.json_on("/ota/state")
    return states[-1] if states else {}


CASES: list[tuple[str, str, list[Callable[[], None]], str, int, str]] = [
    ("committed", "v2.tar", [], "committed", 0, ""),
    ("rejected", "bad.tar", [], "rejected", 1, "golden outputs not reproduced"),
    ("rolled back", "v2.tar", [_failing_check], "rolled_back", 1, "firmware handshake failed"),
    ("non-finite path", "nan.tar", [], "rejected", 1, "preprocess: input tensor holds"),
    ("pickled golden", "pickled.tar", [], "rejected", 1, "golden/outputs.npy"),
]


@pytest.mark.parametrize(
    ("case", "tar", "checks", "outcome", "code", "reason"), CASES, ids=[c[0] for c in CASES]
)
def test_publish_exits_zero_only_when_committed(
    mosquitto: Mosquitto,
    tmp_path: Path,
    kit: dict[str, Path],
    case: str,
    tar: str,
    checks: list[Callable[[], None]],
    outcome: str,
    code: int,
    reason: str,
) -> None:
    state = _device(tmp_path, kit)
    settings = OtaSettings(health=FAST, need_after_s=0.5, transfer_timeout_s=20.0, checks=checks)
    with running(mosquitto, state, settings) as app:
        done = _publish(mosquitto, kit[tar])
        assert app.supervisor.last_error is None  # no worker crashed, whatever the bundle
        assert app.publish_status()["state"] == "idle"
    assert done.returncode == code, done.stderr[-2000:]
    out = json.loads(done.stdout)
    assert out["outcome"] == outcome and out["version"] == 2
    assert out["reply"]["ok"] is True  # the bundle did arrive in every case
    assert reason in out["reason"]
    assert ModelStore(state).state()["current"] == (2 if outcome == "committed" else 1)


def test_an_offer_with_a_string_version_is_refused_before_download(
    mosquitto: Mosquitto, tmp_path: Path, kit: dict[str, Path]
) -> None:
    state = _device(tmp_path, kit)
    with running(mosquitto, state, OtaSettings(health=FAST)):
        done = _publish(mosquitto, kit["string-version.tar"])
    assert done.returncode == 1
    out = json.loads(done.stdout)
    assert out["outcome"] == "rejected" and out["reply"]["ok"] is False
    assert "version: Input should be a valid integer" in out["reason"]
    assert ModelStore(state).state()["current"] == 1


def test_publish_without_a_final_outcome_times_out(
    mosquitto: Mosquitto, tmp_path: Path, kit: dict[str, Path]
) -> None:
    state = _device(tmp_path, kit)
    slow = HealthPolicy(slides=0, seconds=120.0, check_interval_s=0.1)
    settings = OtaSettings(health=slow, need_after_s=0.5, transfer_timeout_s=20.0)
    with running(mosquitto, state, settings):
        done = subprocess.run(
            [
                *(sys.executable, "-m", "deploy.cli", "ota", "publish", str(kit["v2.tar"])),
                *("--broker", mosquitto.url, "--device-id", DEVICE, "--wait", "8"),
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    assert done.returncode == 1
    assert "no final outcome" in done.stderr.strip().splitlines()[-1]


def test_local_install_while_the_daemon_runs_republishes_ota_state(
    mosquitto: Mosquitto, tmp_path: Path, kit: dict[str, Path]
) -> None:
    state = _device(tmp_path, kit)
    settings = OtaSettings(health=FAST)
    with (
        Collector(mosquitto.port, f"{BASE}/ota/state") as col,
        running(mosquitto, state, settings),
    ):
        assert wait_until(lambda: _last_state(col).get("current") == 1, 10)
        # What `omis ota install` does, from outside the daemon.
        Installer(ModelStore(state), TrustStore(state), GoldenGate(state_dir=state)).install(
            kit["v2"]
        )
        assert wait_until(lambda: _last_state(col).get("current") == 2, 10), _last_state(col)
        assert _last_state(col)["last_outcome"]["result"] == "committed"
        ModelStore(state).rollback("operator request")  # what `omis ota rollback` does
        assert wait_until(lambda: _last_state(col).get("current") == 1, 10), _last_state(col)
    # A fresh subscriber gets the retained, current state.
    with Collector(mosquitto.port, f"{BASE}/ota/state") as late:
        assert wait_until(lambda: _last_state(late).get("current") == 1, 5)
