"""Scans started by the firmware's "slide inserted" event, through the real scanner on sim://.

The simulated firmware raises the event on the pseudo-terminal exactly like hardware would;
the event reaches the daemon on the serial reader thread, after any load the scanner did itself.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import pytest
from broker_support import (
    Collector,
    Mosquitto,
    app_config,
    mosquitto_fixture,  # noqa: F401 - the "mosquitto" fixture
    wait_until,
)
from fakes.bundles import make_bundle

from deploy.appliance.base import ScanRequest
from deploy.appliance.service import Appliance
from deploy.broker import find_mosquitto
from deploy.config import load_config
from deploy.scanner import MicroscopeScanner

pytestmark = pytest.mark.skipif(find_mosquitto() is None, reason="mosquitto is not installed")

DEVICE = "ins1"


Body = Callable[[Appliance, MicroscopeScanner, Collector], None]


def _run(mosquitto: Mosquitto, tmp_path: Path, body: Body) -> list[dict[str, object]]:
    bundle = make_bundle(tmp_path / "bundle", seed=1, version=1)
    config = app_config(
        mosquitto.url, DEVICE, scan={"microscope": "sim://", "fields": 1, "scan_on_insert": True}
    )
    scanner = MicroscopeScanner("sim://", bundle.root, tmp_path / "state", sim_size=(64, 48))
    app = Appliance(load_config(environ={}, overrides=config), tmp_path / "state", scanner)
    with Collector(mosquitto.port, f"omis/v1/{DEVICE}/result") as col:
        app.start()
        loop = threading.Thread(target=app.run, daemon=True)
        loop.start()
        try:
            body(app, scanner, col)
        finally:
            app.request_stop()
            loop.join(10)
            app.shutdown()
        return list(col.unique_results().values())


def test_a_requested_scan_does_not_start_a_second_one_from_its_own_slide_load(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    def body(app: Appliance, scanner: MicroscopeScanner, col: Collector) -> None:
        app.submit(ScanRequest("sim0-0003", 1))
        assert wait_until(lambda: len(col.unique_results()) >= 1, 60)
        # The "slide inserted" event of the scanner's own slide load arrives late; give it time
        # to (wrongly) queue a scan before checking that none came.
        threading.Event().wait(1.5)

    results = _run(mosquitto, tmp_path, body)
    assert [r["slide_id"] for r in results] == ["sim0-0003"]
    assert results[0]["source"] == "cli"


def test_a_slide_inserted_by_the_operator_starts_a_scan(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    def body(app: Appliance, scanner: MicroscopeScanner, col: Collector) -> None:
        assert wait_until(lambda: scanner._microscope is not None, 30)
        scanner._microscope.firmware.insert_slide(True)  # the sensor sees a slide arrive
        assert wait_until(lambda: len(col.unique_results()) >= 1, 60)
        threading.Event().wait(1.0)

    results = _run(mosquitto, tmp_path, body)
    assert len(results) == 1
    assert results[0]["source"] == "firmware"
