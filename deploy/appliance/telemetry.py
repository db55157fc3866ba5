"""Telemetry: the retained status, periodic metrics and the health file.

:class:`Telemetry` renders ``omis.status/1`` from the :class:`StatusTracker` and a snapshot of
the queue and outbox, publishes it (retained) when it changes, publishes ``omis.metrics/1``
and rewrites the health file.  Availability (``online`` / ``stopped`` / the ``offline`` will)
belongs to the MQTT link itself.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deploy.appliance.base import ScannerInfo
from deploy.appliance.health import write_health
from deploy.appliance.notify import sd_notify
from deploy.appliance.results import rfc3339
from deploy.appliance.status import Snapshot, StatusTracker, outbox_info
from deploy.appliance.worker import Counters
from deploy.messages.metrics import MetricsMessage
from inference.result import strict_json


@dataclass(frozen=True)
class TelemetryPorts:
    """What telemetry reads and where it publishes."""

    publish: Callable[[str, bytes, int, bool], None]  # (topic, payload, qos, retain)
    snapshot: Callable[[], Snapshot]
    counters: Callable[[], dict[str, int]]  # link, pump, supervisor and router counters
    connected: Callable[[], bool]
    dead_workers: Callable[[], list[str]]
    status_topic: str
    metrics_topic: str


class Telemetry:
    """Status (retained, on change), metrics and the health file of one appliance."""

    def __init__(
        self, status: StatusTracker, scans: Counters, state_dir: Path, ports: TelemetryPorts
    ) -> None:
        self.status = status
        self.scans = scans
        self.state_dir = state_dir
        self.ports = ports
        self._last: str | None = None
        self._lock = threading.Lock()  # the worker, the OTA worker and the main loop publish

    def publish_status(self, force: bool = False) -> dict[str, Any]:
        """Publish the retained status if it changed (or ``force``); returns it."""
        payload = self.status.payload(self.ports.snapshot())
        key = json.dumps(
            {k: v for k, v in payload.items() if k != "at"}, sort_keys=True, allow_nan=False
        )
        with self._lock:
            changed, self._last = force or key != self._last, key
            if changed:
                self.ports.publish(self.ports.status_topic, strict_json(payload), 1, True)
        if changed:
            sd_notify(f"STATUS={payload['state']}")
        return payload

    def record_error(self, code: str, message: str) -> None:
        """Remember an error for the status and publish it."""
        self.status.record_error(code, message)
        self.publish_status()

    def set_updating(self, updating: bool) -> None:
        """An update started or ended."""
        self.status.updating = updating
        self.publish_status()

    def model_loaded(self, info: ScannerInfo) -> None:
        """A model (and engine) now serves."""
        self.status.info = info
        self.publish_status(force=True)

    def shadow_changed(self, shadow: dict[str, Any] | None) -> None:
        """The shadow candidate held (``ota/state``'s ``shadow``) is shown in the status too."""
        if shadow != self.status.shadow:
            self.status.shadow = shadow
            self.publish_status(force=True)

    def note_model(self, model: dict[str, Any] | None) -> None:
        """A result named ``model``: the scanner may have followed a switch another process
        made (``omis ota rollback``)."""
        info = self.status.info
        if info is not None and model is not None and model != info.model:
            self.status.info = ScannerInfo(model, info.engine, info.firmware)

    def metrics(self) -> dict[str, Any]:
        """The ``omis.metrics/1`` document."""
        c = self.scans
        scan_ms = list(c.scan_ms)
        counters = {
            "scans_ok": c.scans_ok,
            "scans_failed": c.scans_failed,
            "scans_cancelled": c.scans_cancelled,
            "scans_rejected": c.scans_rejected,
            **self.ports.counters(),
        }
        identity = self.status.identity
        return MetricsMessage(
            device_id=identity.device_id,
            boot_id=identity.boot_id,
            at=rfc3339(),
            counters=counters,
            latency_ms={
                "scan_last": scan_ms[-1] if scan_ms else None,
                "scan_mean": sum(scan_ms) / len(scan_ms) if scan_ms else None,
            },
            outbox=outbox_info(self.ports.snapshot().outbox),
        ).to_json()

    def publish_metrics(self) -> None:
        """Publish the metrics (QoS 0)."""
        self.ports.publish(self.ports.metrics_topic, strict_json(self.metrics()), 0, False)

    def write_health(self) -> None:
        """Rewrite the health file."""
        snap = self.ports.snapshot()
        state, _ = self.status.state(snap)
        identity = self.status.identity
        write_health(
            self.state_dir,
            {
                "state": state,
                "device_id": identity.device_id,
                "boot_id": identity.boot_id,
                "connected": self.ports.connected(),
                "outbox_rows": snap.outbox.rows,
                "dead_workers": self.ports.dead_workers(),
                "last_error": self.status.last_error,
            },
        )
