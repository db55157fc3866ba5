"""The scanning seam: a :class:`SlideScanner` turns a :class:`ScanRequest` into a result body.

The real implementation (:class:`deploy.scanner.MicroscopeScanner`) composes the microscope
bridge and the inference pipeline; tests use an in-memory fake.  The service wraps the body in
the ``omis.result/1`` envelope (ids, sequence number, timestamps).
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

ScanSource = Literal["cli", "mqtt", "firmware"]
SlideListener = Callable[[str], None]


def new_scan_id() -> str:
    """A fresh scan id."""
    return uuid.uuid4().hex


@dataclass(frozen=True)
class ScanRequest:
    """One slide to scan."""

    slide_id: str
    fields: int
    plan: str = "default"
    source: ScanSource = "cli"
    scan_id: str = field(default_factory=new_scan_id)


@dataclass(frozen=True)
class ScannerInfo:
    """What the scanner runs: reported in the status and in each result."""

    model: dict[str, Any] | None
    engine: dict[str, Any] | None
    firmware: dict[str, Any] | None


class SlideScanner(Protocol):
    """Acquire, compute and classify one slide.

    ``scan`` returns the result body: ``model``, ``backend``, ``prediction`` (``label``,
    ``probabilities``, ``risk``, ``abstained``), ``fields`` (``index``, ``valid_fraction``,
    ``quality``), ``spectrum`` (``algorithm``, ``axis``, ``values``), ``timings_ms`` and, for
    simulated slides, ``simulation`` (``pap_group``).  It checks ``cancel`` between fields and
    raises :class:`~deploy.exceptions.ScanCancelledError` when it is set.
    """

    def open(self) -> ScannerInfo:
        """Open the microscope and warm the engine up; called once before any scan."""
        ...

    def scan(self, request: ScanRequest, cancel: threading.Event) -> dict[str, Any]:
        """Scan one slide; blocking."""
        ...

    def set_slide_listener(self, listener: SlideListener | None) -> None:
        """Call ``listener(slide_id)`` when the firmware reports a slide inserted."""
        ...

    def close(self) -> None:
        """Release the microscope and engine (idempotent)."""
        ...
