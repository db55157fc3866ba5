"""A microscope that is missing when the daemon starts: ``degraded`` (reason named), retried
with exponential back-off, ``idle`` once it appears.  A real pty (the simulated firmware) shows
up at the configured port path while the daemon runs, over a real mosquitto."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from broker_support import (
    Collector,
    FakeScanner,
    Mosquitto,
    app_config,
    mosquitto_fixture,  # noqa: F401 - the "mosquitto" fixture
    running_appliance,
    wait_until,
)

from deploy.appliance.base import ScannerInfo, ScanRequest
from deploy.appliance.service import Appliance
from deploy.broker import find_mosquitto
from deploy.config import load_config
from firmware_bridge.client import ClientConfig, SerialController
from firmware_bridge.sim.firmware import SimConfig, SimulatedFirmware

pytestmark = pytest.mark.skipif(find_mosquitto() is None, reason="mosquitto is not installed")
BASE = "omis/v1/dev1"


class PtyScanner(FakeScanner):
    """The fake imaging path behind a real serial controller on ``port`` (a pty path)."""

    def __init__(self, port: Path) -> None:
        super().__init__()
        self.port = port
        self.attempts: list[float] = []
        self.controller: SerialController | None = None

    def open(self) -> ScannerInfo:
        self.attempts.append(time.monotonic())
        controller = SerialController(str(self.port), ClientConfig(link_wait_s=1.0))
        controller.open()  # BridgeInitError while no device sits at the port
        self.controller = controller
        return super().open()

    def close(self) -> None:
        if self.controller is not None:
            self.controller.close()
        super().close()


def test_missing_microscope_at_start_is_degraded_then_idle_when_it_appears(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    port = tmp_path / "ttyOMIS0"
    scanner = PtyScanner(port)
    config = app_config(
        mosquitto.url, scan={"connect_retry_initial_s": 0.1, "connect_retry_max_s": 0.8}
    )
    app = Appliance(load_config(environ={}, overrides=config), tmp_path / "state", scanner)
    with (
        Collector(mosquitto.port, f"{BASE}/#") as col,
        SimulatedFirmware(SimConfig(speed_um_s=100_000)) as firmware,
        running_appliance(app),  # starts: no exit, no error, no restart loop
    ):

        def status() -> dict[str, object]:
            statuses = col.json_on("/status")
            return statuses[-1] if statuses else {}

        assert wait_until(lambda: status().get("state") == "degraded", 10), status()
        assert "scanner_unavailable" in status()["reasons"]  # type: ignore[operator]
        assert str(port) in str(status()["last_error"])  # the reason names the port
        assert col.on("/availability")[-1] == b"online"
        assert wait_until(lambda: len(scanner.attempts) >= 4, 10), scanner.attempts
        gaps = [b - a for a, b in zip(scanner.attempts, scanner.attempts[1:], strict=False)]
        assert gaps[2] > 1.5 * gaps[0], gaps  # exponential back-off
        port.symlink_to(firmware.port)  # the microscope is plugged in
        assert wait_until(lambda: status().get("state") == "idle", 10), status()
        app.submit(ScanRequest("after-plug", 2))
        assert wait_until(lambda: len(col.unique_results()) == 1, 10)
    states = [s["state"] for s in col.json_on("/status")]
    assert "error" not in states
    assert b"offline" not in col.on("/availability")


def test_scans_are_refused_while_the_microscope_is_missing(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    from deploy.exceptions import ScanRejectedError

    scanner = PtyScanner(tmp_path / "ttyNONE")
    config = app_config(mosquitto.url, scan={"connect_retry_initial_s": 5})
    app = Appliance(load_config(environ={}, overrides=config), tmp_path / "state", scanner)
    with running_appliance(app):
        with pytest.raises(ScanRejectedError) as info:
            app.submit(ScanRequest("S-1", 2))
        assert info.value.code == "unavailable" and "ttyNONE" in str(info.value)
        assert app.queue.depth == 0
