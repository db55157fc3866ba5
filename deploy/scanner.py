"""The real :class:`~deploy.appliance.base.SlideScanner`: microscope bridge + device pipeline.

``open()`` loads the bundle, loads the inference backend, warms it up and passes the golden gate
(:func:`inference.golden.open_checked`), then opens the microscope URL.  ``scan()`` acquires the
request's fields (checking the cancel flag between fields) and runs
:class:`inference.pipeline.SlidePipeline` on them.  With ``sim://`` each request puts the
synthetic slide named by its slide id under the objective (``sim<seed>-NNNN`` is slide NNNN of
the synthetic dataset; any other id gets a deterministic slide of its own) and the result
carries ``simulation.pap_group``.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from deploy.appliance.base import ScannerInfo, ScanRequest, SlideListener
from deploy.exceptions import ScanCancelledError, ScanError

log = logging.getLogger(__name__)

SIM_SLIDE_RE = re.compile(r"sim(\d+)-(\d+)")
SIM_SIZE = (320, 256)  # small frames keep the simulated appliance fast on CPU-only machines


def active_bundle_path(state_dir: Path) -> Path:
    """The active model of the model store (``<state-dir>/models/current``)."""
    current = state_dir / "models" / "current"
    if current.is_dir():
        return current.resolve()
    if current.is_file():
        target = Path(current.read_text("utf-8").strip())
        return target if target.is_absolute() else (current.parent / target).resolve()
    raise ScanError(f"no active model in {state_dir / 'models'}; pass --bundle")


def sim_seed(url: str) -> int:
    """The ``seed`` of a ``sim://`` URL (0 by default)."""
    values = parse_qs(urlsplit(url).query).get("seed", ["0"])
    return int(values[0]) if values[0].isdigit() else 0


class MicroscopeScanner:
    """Microscope + inference pipeline behind the scanner seam."""

    def __init__(
        self,
        microscope_url: str,
        bundle_path: Path,
        state_dir: Path,
        backend: str = "auto",
    ) -> None:
        self.microscope_url = microscope_url
        self.bundle_path = bundle_path
        self.state_dir = state_dir
        self.backend_name = backend
        self._microscope: Any = None
        self._pipeline: Any = None
        self._backend: Any = None
        self._listener: SlideListener | None = None
        self._loading = threading.Event()  # our own load_slide must not trigger a scan

    @property
    def simulated(self) -> bool:
        """True for ``sim://`` microscopes."""
        return self.microscope_url.startswith("sim://")

    def open(self) -> ScannerInfo:
        """Load and golden-check the model, then open the microscope."""
        from firmware_bridge.microscope import open_microscope
        from inference.backends import BackendOptions
        from inference.bundle import load_bundle
        from inference.golden import open_checked
        from inference.pipeline import SlidePipeline

        bundle = load_bundle(self.bundle_path)
        options = BackendOptions(state_dir=str(self.state_dir))
        self._backend, _ = open_checked(self.backend_name, bundle, options)
        self._pipeline = SlidePipeline(bundle, self._backend)
        size = SIM_SIZE if self.simulated else None
        self._microscope = open_microscope(self.microscope_url, size=size)
        controller = getattr(self._microscope, "controller", None)
        if controller is not None:
            controller.add_event_listener(self._on_event)
        described = self._microscope.describe()
        return ScannerInfo(
            model=bundle.describe(),
            engine=self._backend.describe(),
            firmware=described.get("firmware"),
        )

    def set_slide_listener(self, listener: SlideListener | None) -> None:
        """Call ``listener(slide_id)`` on the firmware's "slide inserted" event."""
        self._listener = listener

    def _on_event(self, event: Any) -> None:
        if event.kind != "slide_inserted" or self._loading.is_set() or self._listener is None:
            return
        described = self._microscope.describe() if self._microscope else {}
        slide_id = (described.get("simulation") or {}).get("slide_id")
        self._listener(str(slide_id or f"slide-{int(event.received_at)}"))

    def _load_sim_slide(self, slide_id: str) -> None:
        from firmware_bridge.sim.sample import SyntheticSlide, slide_for

        seed = sim_seed(self.microscope_url)
        match = SIM_SLIDE_RE.fullmatch(slide_id)
        if match and int(match.group(1)) == seed:
            slide = slide_for(int(match.group(2)), seed)
        else:
            like = slide_for(zlib.crc32(slide_id.encode()) % 100_000, seed)
            slide = SyntheticSlide(slide_id, like.pap_group, like.seed)
        self._loading.set()
        try:
            self._microscope.load_slide(slide)
        finally:
            self._loading.clear()

    def _fields(self, request: ScanRequest, cancel: threading.Event) -> Iterator[Any]:
        plan = self._microscope.default_plan(request.fields)
        for pair in self._microscope.acquire_fields(plan):
            if cancel.is_set():
                raise ScanCancelledError(f"scan {request.scan_id} cancelled")
            yield pair

    def scan(self, request: ScanRequest, cancel: threading.Event) -> dict[str, Any]:
        """Acquire and classify one slide."""
        if self._microscope is None or self._pipeline is None:
            raise ScanError("scanner is not open")
        if self.simulated:
            self._load_sim_slide(request.slide_id)
        result = self._pipeline.run_slide(self._fields(request, cancel))
        if cancel.is_set():
            raise ScanCancelledError(f"scan {request.scan_id} cancelled")
        return self._body(result)

    def _body(self, result: Any) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": result.model,
            "backend": result.backend,
            "prediction": {
                "label": result.label,
                "probabilities": result.probabilities,
                "risk": result.risk,
                "abstained": result.abstained,
            },
            "fields": [
                {
                    "index": q.index,
                    "valid_fraction": q.valid_fraction,
                    "quality": q.verdict,
                    "reasons": list(q.reasons),
                }
                for q in result.fields
            ],
            "spectrum": {
                "algorithm": result.spectrum.algorithm,
                "axis": result.spectrum.x_nm.tolist(),
                "values": result.spectrum.y.tolist(),
            },
            "timings_ms": result.timings_ms,
        }
        described = self._microscope.describe()
        body["firmware"] = described.get("firmware")
        simulation = described.get("simulation")
        if simulation is not None:
            body["simulation"] = {
                "pap_group": simulation.get("pap_group"),
                "slide_seed": simulation.get("slide_seed"),
            }
        return body

    def close(self) -> None:
        """Close the microscope and the backend (idempotent)."""
        microscope, self._microscope = self._microscope, None
        backend, self._backend = self._backend, None
        self._pipeline = None
        try:
            if microscope is not None:
                microscope.close()
        finally:
            if backend is not None:
                backend.close()


def resolve_bundle(bundle: str | os.PathLike[str] | None, state_dir: Path) -> Path:
    """``--bundle`` if given, else the active model of the state dir's model store."""
    return Path(bundle) if bundle else active_bundle_path(state_dir)
