"""kill -9 at every install step, then restart: the device serves the old model or the new,
committed one, never anything in between."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest
from ota_support import make_bundle, make_keys

from deploy.ota import GoldenGate, Installer, ModelStore, TrustStore
from inference.bundle import Bundle

CHILD = Path(__file__).with_name("ota_crash_child.py")
OK_STEPS = ["begin", "staged", "verified", "placed", "checked", "switched", "health", "committed"]
UNHEALTHY_STEPS = ["switched", "health", "rolled_back"]


@pytest.fixture(scope="module")
def material(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("crash")
    priv, pub = make_keys(d / "keys")
    return {
        "pub": pub,
        "v1": make_bundle(d / "v1", 1, key=priv),
        "v2": make_bundle(d / "v2", 2, key=priv),
    }


def _no_gate(bundle: Bundle) -> None:
    """The gate is tested elsewhere; recovery is the subject here."""


def _device_on_v1(tmp_path: Path, material: dict[str, Path]) -> Path:
    state = tmp_path / "state"
    TrustStore(state).add(material["pub"])
    Installer(ModelStore(state), TrustStore(state), GoldenGate(backend="onnxruntime")).install(
        material["v1"]
    )
    return state


def _run_child(state: Path, bundle: Path, step: str, mode: str) -> int:
    proc = subprocess.run(
        [sys.executable, str(CHILD), str(state), str(bundle), step, mode],
        capture_output=True,
        timeout=60,
        check=False,
    )
    return proc.returncode


def _assert_consistent(state: Path, expected_version: int) -> None:
    store = ModelStore(state)
    st = store.read_state()
    assert not st.pending
    assert store.read_journal() is None
    assert list((state / "models" / "staging").iterdir()) == []
    referenced = {s.dir for s in (st.current, st.previous) if s is not None}
    assert {p.name for p in (state / "models" / "bundles").iterdir()} == referenced
    active = store.active()  # re-verifies every file of the serving bundle
    assert active is not None
    assert active.manifest.version == expected_version
    if expected_version == 2:
        assert st.previous is not None and st.previous.version == 1


@pytest.mark.parametrize("step", OK_STEPS)
def test_kill_during_install(tmp_path: Path, material: dict[str, Path], step: str) -> None:
    state = _device_on_v1(tmp_path, material)
    rc = _run_child(state, material["v2"], step, "ok")
    assert rc == -signal.SIGKILL
    action = ModelStore(state).recover()
    expected = 2 if step == "committed" else 1
    _assert_consistent(state, expected)
    if step in ("switched", "health"):
        assert action == "rolled_back"
        last = ModelStore(state).state()["last_outcome"]
        assert last["result"] == "rolled_back" and "restarted" in last["reason"]
    # After recovery the same update installs cleanly.
    if expected == 1:
        Installer(ModelStore(state), TrustStore(state), _no_gate).install(material["v2"])
        _assert_consistent(state, 2)


@pytest.mark.parametrize("step", UNHEALTHY_STEPS)
def test_kill_during_failed_health(tmp_path: Path, material: dict[str, Path], step: str) -> None:
    state = _device_on_v1(tmp_path, material)
    assert _run_child(state, material["v2"], step, "unhealthy") == -signal.SIGKILL
    ModelStore(state).recover()
    _assert_consistent(state, 1)


def test_unhealthy_without_kill_rolls_back(tmp_path: Path, material: dict[str, Path]) -> None:
    state = _device_on_v1(tmp_path, material)
    assert _run_child(state, material["v2"], "-", "unhealthy") == 3
    _assert_consistent(state, 1)
    last = ModelStore(state).state()["last_outcome"]
    assert last["result"] == "rolled_back" and "firmware handshake failed" in last["reason"]
