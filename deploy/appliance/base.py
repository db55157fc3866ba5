"""The scanning seam: a :class:`SlideScanner` turns a :class:`ScanRequest` into a result body.

The real implementation (:class:`deploy.scanner.MicroscopeScanner`) composes the microscope
bridge and the inference pipeline; tests use an in-memory fake.  The scan worker wraps the
report in the ``omis.result/1`` envelope (ids, sequence number, timestamps).  A scanner that can
also switch models between slides is a :class:`ModelSwapper` (OTA).
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol, runtime_checkable

if TYPE_CHECKING:
    from inference.bundle import Bundle, Manifest
    from inference.result import SlideReport

ScanSource = Literal["cli", "mqtt", "firmware"]
# How a slide judges the model on probation (OTA health period); see deploy.appliance.worker.
SlideVerdict = Literal["ok", "abstained", "no_usable_field", "failed", "hardware"]
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

    ``scan`` returns the slide's typed :class:`~inference.result.SlideReport` (classified or
    abstained); it raises :class:`~deploy.exceptions.ScanCancelledError` when ``cancel`` is set
    between fields and a project error when the device path breaks (the worker turns both into
    ``cancelled`` / ``failed`` results).
    """

    def open(self) -> ScannerInfo:
        """Open the microscope and warm the engine up; called once before any scan."""
        ...

    def scan(self, request: ScanRequest, cancel: threading.Event) -> SlideReport:
        """Scan one slide; blocking."""
        ...

    def set_slide_listener(self, listener: SlideListener | None) -> None:
        """Call ``listener(slide_id)`` when the firmware reports a slide inserted."""
        ...

    def close(self) -> None:
        """Release the microscope and engine (idempotent)."""
        ...


@dataclass(frozen=True)
class ShadowOutcome:
    """A shadow candidate's call on the slide just scanned (never a clinical result)."""

    candidate: dict[str, Any]  # name, version, sha256
    report: SlideReport | None  # None when the candidate failed on the slide
    error: str | None = None


@runtime_checkable
class ShadowRunner(Protocol):
    """A scanner that may run a shadow candidate beside the serving model."""

    def take_shadow(self) -> ShadowOutcome | None:
        """The shadow candidate's call on the last scanned slide (once), or None; called after
        the slide's serving result is committed, before the next slide."""
        ...


@runtime_checkable
class ShadowHost(Protocol):
    """A scanner that can gate a shadow candidate (OTA ``mode: shadow``)."""

    def check_shadow(self, manifest: Manifest) -> None:
        """Refuse (raise) a candidate whose spectrum parameters differ from the serving one's."""
        ...

    def prepare_shadow(self, bundle: Bundle) -> None:
        """Same spectrum check, then the normal golden gate beside the serving model."""
        ...


@runtime_checkable
class ModelSwapper(Protocol):
    """A scanner that can load a model beside the serving one and switch between slides."""

    @property
    def follows_store(self) -> bool:
        """True when it serves the model store's active model (no pinned bundle)."""
        ...

    def prepare_model(self, bundle: Bundle) -> None:
        """Load and golden-gate ``bundle`` beside the serving model; raise to refuse it."""
        ...

    def discard_prepared(self) -> None:
        """Drop a prepared model (idempotent)."""
        ...

    def unload_model(self) -> ScannerInfo:
        """Serve no model any more (the store has none); slide lock held."""
        ...

    def load_model(self, bundle: Bundle, generation: int | None) -> ScannerInfo:
        """Serve ``bundle`` from the next slide on (slide lock held); raise to refuse it."""
        ...
