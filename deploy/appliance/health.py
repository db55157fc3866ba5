"""The health file a supervisor can query: ``<state-dir>/run/health.json``.

The daemon rewrites it atomically every ``service.health_interval_s``.  ``omis serve --health``
(:func:`check_health`) reports healthy when the file is fresh (younger than three intervals),
its process is alive and its state is not ``error``.  Freshness is measured on the boot clock
(:mod:`deploy.appliance.uptime`), never the wall clock: a step back of the date must not make a
hung daemon look healthy.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from deploy.appliance import uptime
from firmware_bridge.fsutil import atomic_write_text, pid_alive

HEALTH_FILE = Path("run") / "health.json"
STALE_FACTOR = 3.0


def health_path(state_dir: Path) -> Path:
    """Where the health file of ``state_dir`` lives."""
    return state_dir / HEALTH_FILE


def write_health(state_dir: Path, report: dict[str, Any]) -> None:
    """Write the health report atomically, stamped with pid and time."""
    # ``at`` (wall time) is for people; freshness is judged on the boot clock.
    body = dict(report, pid=os.getpid(), at=time.time(), **uptime.stamp())
    atomic_write_text(health_path(state_dir), json.dumps(body, sort_keys=True, allow_nan=False))


def check_health(state_dir: Path, interval_s: float, now: float | None = None) -> tuple[bool, str]:
    """``(healthy, one-line reason)`` from the health file (``now``: boot-clock seconds)."""
    path = health_path(state_dir)
    try:
        report = json.loads(path.read_text("utf-8"))
        if not isinstance(report, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as exc:
        return False, f"no readable health file at {path}: {exc}"
    age = uptime.age_s(report, now)
    if age is None:
        return False, "health file is stale (written in another boot, or without a clock stamp)"
    # The boot clock never goes back: a stamp "from the future" is a faked or foreign clock.
    if age < 0 or age > STALE_FACTOR * interval_s:
        return False, f"health file is stale ({age:.0f} s old)"
    if not pid_alive(int(report.get("pid", 0))):
        return False, f"process {report.get('pid')} is not running"
    state = report.get("state")
    if state == "error":
        return False, f"state error: {report.get('last_error')}"
    return True, (
        f"state {state}, mqtt {'connected' if report.get('connected') else 'disconnected'}, "
        f"outbox {report.get('outbox_rows')} row(s)"
    )
