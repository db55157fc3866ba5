"""The retained ``omis.status/1`` document and the rule that picks the device state."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

from deploy.appliance.base import ScannerInfo, ScanRequest
from deploy.appliance.results import Identity, rfc3339
from deploy.messages.status import STATUS_SCHEMA, OutboxInfo, StatusMessage
from deploy.outbox import OutboxStats

__all__ = ["STATUS_SCHEMA", "Snapshot", "StatusTracker", "outbox_info"]


@dataclass(frozen=True)
class Snapshot:
    """What the state depends on, sampled at one moment."""

    current: ScanRequest | None
    queue_depth: int
    queue_capacity: int
    outbox: OutboxStats


class StatusTracker:
    """Holds the slow-changing parts of the status and renders the payload; thread-safe."""

    def __init__(self, identity: Identity, app_version: str) -> None:
        self.identity = identity
        self.app_version = app_version
        self.info: ScannerInfo | None = None
        self.updating = False
        self.fatal: str | None = None
        # Faults recovered from that a person should look at (an outbox recreated under the
        # daemon, ...): the device keeps working, ``degraded`` with these reasons until restart.
        self.faults: set[str] = set()
        self._last_error: dict[str, str] | None = None
        self._lock = threading.Lock()

    def record_error(self, code: str, message: str) -> None:
        """Remember the latest error for the status document."""
        with self._lock:
            self._last_error = {"code": code, "message": message[:500], "at": rfc3339()}

    @property
    def last_error(self) -> dict[str, str] | None:
        """The latest error, if any."""
        with self._lock:
            return None if self._last_error is None else dict(self._last_error)

    def state(self, snap: Snapshot) -> tuple[str, list[str]]:
        """``(state, reasons)``: error > degraded > updating > scanning > idle."""
        reasons: list[str] = []
        if self.fatal:
            return "error", [self.fatal]
        if snap.outbox.full:
            reasons.append("outbox_full")
        reasons.extend(sorted(self.faults))
        if self.info is None:
            reasons.append("scanner_unavailable")
        elif self.info.model is None:
            reasons.append("no_model")  # first boot: waiting for a model over OTA
        if reasons:
            return "degraded", reasons
        if self.updating:
            return "updating", []
        return ("scanning" if snap.current else "idle"), []

    def message(self, snap: Snapshot) -> StatusMessage:
        """The typed status for ``snap``."""
        state, reasons = self.state(snap)
        info = self.info
        current = snap.current
        return StatusMessage.model_validate(
            {
                "device_id": self.identity.device_id,
                "state": state,
                "reasons": reasons,
                "boot_id": self.identity.boot_id,
                "app_version": self.app_version,
                "model": info.model if info else None,
                "engine": info.engine if info else None,
                "firmware": info.firmware if info else None,
                "current_scan": (
                    {"scan_id": current.scan_id, "slide_id": current.slide_id} if current else None
                ),
                "queue": {"depth": snap.queue_depth, "capacity": snap.queue_capacity},
                "outbox": outbox_info(snap.outbox),
                "last_error": self.last_error,
                "at": rfc3339(),
            }
        )

    def payload(self, snap: Snapshot) -> dict[str, Any]:
        """The status document for ``snap`` (JSON data of :meth:`message`)."""
        return self.message(snap).to_json()


def outbox_info(stats: OutboxStats) -> OutboxInfo:
    """The outbox part of status and metrics."""
    return OutboxInfo(rows=stats.rows, bytes=stats.bytes, full=stats.full)
