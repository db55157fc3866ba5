"""Software overhead of field-pair acquisition over the simulated hardware's own timings.

For each configuration, acquires N fields through ``sim://`` (the simulated firmware on a real
pty, driven by the serial client, and the synthetic camera) and compares the measured wall
time per field with the time the simulated hardware itself needs: stage travel, the settle
wait, LED settle and exposure.  "render ms" is the synthetic camera's rendering time beyond
the exposure window (simulator CPU, absent with a real camera); "bridge ovh" excludes it and
is the software overhead of the bridge itself.  Goal: bridge overhead < 5 %.

    .venv/bin/python benchmarks/bench_acquisition.py [--fields 20]
"""

from __future__ import annotations

import argparse
import time

from firmware_bridge.acquisition import AcquisitionSettings, ScanPlan
from firmware_bridge.microscope import SimMicroscope, open_microscope

CONFIGS = [
    # (label, URL, frame size, step µm)
    ("160x128, 20 mm/s", "sim://?seed=1&speed=20000", (160, 128), 800.0),
    ("640x512, 20 mm/s", "sim://?seed=1&speed=20000", (640, 512), 800.0),
    ("640x512, 5 mm/s", "sim://?seed=1&speed=5000", (640, 512), 800.0),
]


def run(url: str, size: tuple[int, int], step: float, fields: int) -> tuple[float, float, float]:
    """Return (wall, simulated hardware, simulator render excess), seconds per field."""
    settings = AcquisitionSettings(settle_ms=20.0)
    plan = ScanPlan(fields=fields, origin_um=(5000, 5000), step_um=(step, step))
    with open_microscope(url, size=size) as scope:
        assert isinstance(scope, SimMicroscope)
        scope.controller.home()
        # Start at the first field so every measured move is one step.
        scope.controller.move_to(plan.positions()[0])
        cam = scope.synthetic_camera
        travel0, cam0, render0 = scope.firmware.travel_s, cam.hardware_s, cam.render_excess_s
        start = time.perf_counter()
        for _ in scope.acquire_fields(plan, settings):
            pass
        wall = time.perf_counter() - start
        hardware = (
            scope.firmware.travel_s
            - travel0
            + cam.hardware_s
            - cam0
            + fields * settings.settle_ms / 1000
        )
        render = cam.render_excess_s - render0
    return wall / fields, hardware / fields, render / fields


def main() -> None:
    """Print the overhead table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fields", type=int, default=20)
    args = parser.parse_args()
    header = ("configuration", "hw ms", "wall ms", "render ms", "total ovh", "bridge ovh")
    print("{:<18} {:>8} {:>8} {:>10} {:>10} {:>11}".format(*header))
    for label, url, size, step in CONFIGS:
        wall, hardware, render = run(url, size, step, args.fields)
        total = (wall - hardware) / hardware * 100
        bridge = (wall - render - hardware) / hardware * 100
        print(
            f"{label:<18} {hardware * 1e3:>8.1f} {wall * 1e3:>8.1f} {render * 1e3:>10.1f}"
            f" {total:>9.1f}% {bridge:>10.1f}%"
        )


if __name__ == "__main__":
    main()
