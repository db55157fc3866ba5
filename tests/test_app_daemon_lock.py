"""One daemon per state directory: a second ``omis serve`` exits at once naming the holder."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from broker_support import (
    Collector,
    Mosquitto,
    mosquitto_fixture,  # noqa: F401 - the "mosquitto" fixture
    wait_until,
)
from fakes.bundles import make_bundle

from deploy.daemon_lock import DaemonLock, DaemonLockedError

OMIS = [sys.executable, "-m", "deploy.cli"]


def _serve(mosquitto: Mosquitto, bundle: Path, state: Path) -> subprocess.Popen[str]:
    cmd = [
        *OMIS, "serve", "--microscope", "sim://", "--broker", mosquitto.url,
        "--bundle", str(bundle), "--state-dir", str(state),
    ]  # fmt: skip
    env = dict(os.environ, OMIS_DEVICE__ID="lock1")
    return subprocess.Popen(
        cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env
    )


def _stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_second_serve_on_the_same_state_dir_exits_at_once(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    make_bundle(tmp_path / "bundle")
    state = tmp_path / "state"
    with Collector(mosquitto.port, "omis/v1/lock1/availability") as col:
        first = _serve(mosquitto, tmp_path / "bundle", state)
        try:
            assert wait_until(lambda: b"online" in col.on("/availability"), 60)
            t0 = time.monotonic()
            second = _serve(mosquitto, tmp_path / "bundle", state)
            _, err = second.communicate(timeout=30)
            took = time.monotonic() - t0
            assert second.returncode == 1
            line = err.strip().splitlines()[-1]
            assert str(state) in line and f"pid {first.pid}" in line, err
            assert took < 15  # at once: no broker connection, no model loading
            time.sleep(1.0)
            # The first daemon was never knocked off the broker.
            assert col.on("/availability") == [b"online"] and first.poll() is None
        finally:
            _stop(first)
        assert first.returncode == 0
    DaemonLock(state).acquire()  # released with the first daemon's exit


def test_lock_is_exclusive_and_released(tmp_path: Path) -> None:
    with DaemonLock(tmp_path), pytest.raises(DaemonLockedError, match=f"pid {os.getpid()}"):
        DaemonLock(tmp_path).acquire()
    with DaemonLock(tmp_path):
        pass
