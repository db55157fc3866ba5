"""A clock for heartbeats that wall-clock steps cannot fool: the kernel's boot time.

``CLOCK_BOOTTIME`` counts seconds since boot (suspend included), the same in every process,
and never jumps when NTP, an RTC without a battery or an administrator sets the date.  It is
only comparable within one boot, so a stamp carries the kernel's boot id; a stamp from
another boot is simply old.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

BOOT_ID_FILE = Path("/proc/sys/kernel/random/boot_id")
_CLOCK = getattr(time, "CLOCK_BOOTTIME", time.CLOCK_MONOTONIC)


def kernel_boot_id() -> str:
    """This boot's id (empty when the kernel does not expose one)."""
    try:
        return BOOT_ID_FILE.read_text("ascii").strip()
    except OSError:
        return ""


def uptime_s() -> float:
    """Seconds since boot on the monotonic boot clock."""
    return time.clock_gettime(_CLOCK)


def stamp() -> dict[str, Any]:
    """The fields a heartbeat carries: ``uptime_s`` and ``kernel_boot_id``."""
    return {"uptime_s": uptime_s(), "kernel_boot_id": kernel_boot_id()}


def age_s(report: dict[str, Any], now: float | None = None) -> float | None:
    """Seconds since ``report`` was stamped, or None when it cannot be told (no stamp, or a
    stamp from another boot: the writer is gone)."""
    then = report.get("uptime_s")
    if not isinstance(then, (int, float)) or isinstance(then, bool):
        return None
    if report.get("kernel_boot_id") != kernel_boot_id():
        return None
    return (uptime_s() if now is None else now) - float(then)
