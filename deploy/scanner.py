"""The real :class:`~deploy.appliance.base.SlideScanner`: microscope bridge + device pipeline.

``open()`` loads the bundle, loads the inference backend, warms it up and passes the golden gate
(:func:`inference.golden.open_checked`), then opens the microscope URL.  Without an explicit
bundle the scanner serves the model store's active model (``<state-dir>/models/state.json``) and
follows it: at every slide boundary it compares :meth:`ModelStore.generation` with the generation
it loaded and reloads on a change, so each result names exactly the model that produced it.  For
OTA it can also load a new model *beside* the serving one (:meth:`prepare_model`, golden-gated)
and swap it in between slides (:meth:`load_model`).  ``scan()`` acquires the
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from deploy.appliance.base import ScannerInfo, ScanRequest, SlideListener
from deploy.config import InferenceConfig
from deploy.exceptions import ScanCancelledError, ScanError
from inference.exceptions import InferenceError
from inference.pipeline import NoUsableFieldError
from inference.spectrum import SpectrumBackend

log = logging.getLogger(__name__)

SIM_SLIDE_RE = re.compile(r"sim(\d+)-(\d+)")
SIM_SIZE = (320, 256)  # small frames keep the simulated appliance fast on CPU-only machines


def active_bundle_path(state_dir: Path) -> Path:
    """Directory of the model store's active model (``current`` in ``models/state.json``)."""
    from deploy.ota.store import ModelStore

    store = ModelStore(state_dir)
    current = store.read_state().current
    if current is None:
        raise ScanError(f"no active model in {store.root}; install one or pass --bundle")
    return store.bundle_path(current)


def sim_seed(url: str) -> int:
    """The ``seed`` of a ``sim://`` URL (0 by default)."""
    values = parse_qs(urlsplit(url).query).get("seed", ["0"])
    return int(values[0]) if values[0].isdigit() else 0


@dataclass
class _Served:
    """One loaded model: bundle, golden-checked backend, pipeline, store generation."""

    bundle: Any
    backend: Any
    pipeline: Any
    generation: int | None = None

    def close(self) -> None:
        """Close the backend."""
        self.backend.close()


def _fields_json(fields: Any) -> list[dict[str, Any]]:
    return [
        {
            "index": q.index,
            "valid_fraction": q.valid_fraction,
            "quality": q.verdict,
            "reasons": list(q.reasons),
        }
        for q in fields
    ]


class MicroscopeScanner:
    """Microscope + inference pipeline behind the scanner seam.

    ``bundle_path=None`` serves (and follows) the model store of ``state_dir``; a path pins that
    bundle for this run (``--bundle``).  ``scan``, ``load_model`` and ``close`` are called by
    one thread at a time (the service's slide lock); ``prepare_model`` may run beside a scan.
    """

    def __init__(
        self,
        microscope_url: str,
        bundle_path: Path | None,
        state_dir: Path,
        inference: InferenceConfig | None = None,
        sim_size: tuple[int, int] = SIM_SIZE,
    ) -> None:
        self.microscope_url = microscope_url
        self.bundle_path = bundle_path
        self.state_dir = state_dir
        self.inference = inference or InferenceConfig()
        self._spectra: SpectrumBackend | None = None  # opened once by open(), shared by models
        self.sim_size = sim_size
        self._microscope: Any = None
        self._served: _Served | None = None
        self._prepared: _Served | None = None
        self._prepare_lock = threading.Lock()
        self._listener: SlideListener | None = None
        # Our own load_slide must not trigger a scan.  The firmware's "slide inserted" event
        # arrives later on the reader thread, so count the inserts we caused and swallow as
        # many events (a time window around load_slide would let them through).
        self._own_inserts = 0
        self._own_inserts_lock = threading.Lock()

    @property
    def simulated(self) -> bool:
        """True for ``sim://`` microscopes."""
        return self.microscope_url.startswith("sim://")

    @property
    def follows_store(self) -> bool:
        """True when the model comes from the model store (no pinned ``--bundle``)."""
        return self.bundle_path is None

    @property
    def model(self) -> dict[str, Any] | None:
        """Name, version and sha256 of the model serving now."""
        served = self._served
        return None if served is None else dict(served.bundle.describe())

    def _open_model(self, bundle: Any, generation: int | None) -> _Served:
        from inference.opening import open_inference_backend
        from inference.pipeline import PipelineConfig, SlidePipeline

        if self._spectra is None:
            raise ScanError("the spectrum backend is not open")
        backend = open_inference_backend(self.inference.backend, bundle, self._backend_options())
        try:
            pipeline = SlidePipeline(
                bundle, backend, PipelineConfig(spectrum_backend=self._spectra)
            )
        except BaseException:
            backend.close()
            raise
        return _Served(bundle, backend, pipeline, generation)

    def _backend_options(self) -> Any:
        from inference.backends import BackendOptions

        cfg = self.inference
        return BackendOptions(
            precision=cfg.precision,
            max_batch=cfg.max_batch,
            opt_batch=cfg.opt_batch,
            state_dir=str(self.state_dir),
            provider=cfg.ort_provider,
            device=cfg.device,
        )

    def _store_model(self) -> tuple[Any, int]:
        from deploy.ota.store import ModelStore

        store = ModelStore(self.state_dir)
        state = store.read_state()  # one read: the bundle and its generation agree
        if state.current is None:
            raise ScanError(f"no active model in {store.root}; install one or pass --bundle")
        return store.open_slot(state.current), state.generation

    def open(self) -> ScannerInfo:
        """Load and golden-check the model, then open the microscope."""
        from firmware_bridge.microscope import open_microscope
        from inference.bundle import load_bundle
        from inference.opening import open_spectrum_backend

        if self._spectra is None:
            self._spectra = open_spectrum_backend(self.inference.spectrum_backend)
        if self.bundle_path is None:
            bundle, generation = self._store_model()
            self._served = self._open_model(bundle, generation)
        else:
            self._served = self._open_model(load_bundle(self.bundle_path), None)
        size = self.sim_size if self.simulated else None
        self._microscope = open_microscope(self.microscope_url, size=size)
        controller = getattr(self._microscope, "controller", None)
        if controller is not None:
            controller.add_event_listener(self._on_event)
        return self.info()

    def info(self) -> ScannerInfo:
        """What serves now: model, engine, firmware."""
        served = self._served
        described = self._microscope.describe() if self._microscope is not None else {}
        return ScannerInfo(
            model=None if served is None else served.bundle.describe(),
            engine=None if served is None else served.backend.describe(),
            firmware=described.get("firmware"),
        )

    # -- model switching (OTA) ---------------------------------------------------------------

    def prepare_model(self, bundle: Any) -> None:
        """Load ``bundle`` beside the serving model and pass its golden gate; keep it ready.

        Raises :class:`~inference.exceptions.InferenceError` when it does not pass.
        """
        ready = self._open_model(bundle, None)
        with self._prepare_lock:
            old, self._prepared = self._prepared, ready
        if old is not None:
            old.close()

    def discard_prepared(self) -> None:
        """Drop a prepared model that will not be switched to (idempotent)."""
        with self._prepare_lock:
            old, self._prepared = self._prepared, None
        if old is not None:
            old.close()

    def load_model(self, bundle: Any, generation: int | None) -> ScannerInfo:
        """Serve ``bundle`` from the next slide on; call between slides (slide lock held).

        Uses the prepared model when it is this bundle, else loads and gates it now.  On
        failure the serving model stays.
        """
        served = self._served
        if served is not None and served.bundle.manifest_bytes == bundle.manifest_bytes:
            served.generation = generation  # already serving it (e.g. a rollback of a refusal)
            return self.info()
        with self._prepare_lock:
            ready, self._prepared = self._prepared, None
        if ready is None or ready.bundle.manifest_bytes != bundle.manifest_bytes:
            if ready is not None:
                ready.close()
            ready = self._open_model(bundle, generation)
        ready.generation = generation
        self._served = ready
        if served is not None:
            served.close()
        log.info("now serving %s", bundle.describe())
        return self.info()

    def _follow_store(self) -> None:
        """Reload at a slide boundary when another process switched the store's model."""
        from deploy.ota.store import ModelStore

        served = self._served
        if not self.follows_store or served is None:
            return
        if ModelStore(self.state_dir).generation() == served.generation:
            return
        bundle, generation = self._store_model()
        log.info(
            "model store changed (generation %s -> %d): reloading", served.generation, generation
        )
        self.load_model(bundle, generation)

    def set_slide_listener(self, listener: SlideListener | None) -> None:
        """Call ``listener(slide_id)`` on the firmware's "slide inserted" event."""
        self._listener = listener

    def _on_event(self, event: Any) -> None:
        if event.kind != "slide_inserted" or self._listener is None:
            return
        with self._own_inserts_lock:
            if self._own_inserts > 0:
                self._own_inserts -= 1
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
        with self._own_inserts_lock:
            self._own_inserts += 1
        try:
            self._microscope.load_slide(slide)
        except BaseException:
            with self._own_inserts_lock:
                self._own_inserts -= 1
            raise

    def _fields(self, request: ScanRequest, cancel: threading.Event) -> Iterator[Any]:
        plan = self._microscope.default_plan(request.fields)
        for pair in self._microscope.acquire_fields(plan):
            if cancel.is_set():
                raise ScanCancelledError(f"scan {request.scan_id} cancelled")
            yield pair

    def scan(self, request: ScanRequest, cancel: threading.Event) -> dict[str, Any]:
        """Acquire and classify one slide with the model serving when it starts."""
        if self._microscope is None or self._served is None:
            raise ScanError("scanner is not open")
        try:
            self._follow_store()
        except InferenceError as exc:
            raise ScanError(f"the store's new model could not be loaded: {exc}") from exc
        served = self._served
        if self.simulated:
            self._load_sim_slide(request.slide_id)
        try:
            result = served.pipeline.run_slide(self._fields(request, cancel))
        except NoUsableFieldError as exc:
            if cancel.is_set():
                raise ScanCancelledError(f"scan {request.scan_id} cancelled") from exc
            # Nothing to classify, but the slide was scanned: publish a result that says so and
            # flags the slide for review, rather than leaving the dashboard without one.
            log.warning("slide %s: %s; published for review", request.slide_id, exc)
            return self._unusable_body(served, exc)
        if cancel.is_set():
            raise ScanCancelledError(f"scan {request.scan_id} cancelled")
        return self._body(result)

    def _unusable_body(self, served: Any, exc: NoUsableFieldError) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": served.bundle.describe(),
            "backend": served.backend.describe(),
            "prediction": {
                "label": None,
                "probabilities": {},
                "risk": None,
                "abstained": True,
                "reason": "no field passed quality control",
            },
            "fields": _fields_json(exc.fields),
            "spectrum": {"algorithm": served.pipeline.params.algorithm, "axis": [], "values": []},
            "timings_ms": exc.timings_ms,
        }
        return self._add_microscope(body)

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
            "fields": _fields_json(result.fields),
            "spectrum": {
                "algorithm": result.spectrum.algorithm,
                "axis": result.spectrum.x_nm.tolist(),
                "values": result.spectrum.y.tolist(),
            },
            "timings_ms": result.timings_ms,
        }
        return self._add_microscope(body)

    def _add_microscope(self, body: dict[str, Any]) -> dict[str, Any]:
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
        """Close the microscope and the backends (idempotent)."""
        microscope, self._microscope = self._microscope, None
        served, self._served = self._served, None
        try:
            if microscope is not None:
                microscope.close()
        finally:
            self.discard_prepared()
            if served is not None:
                served.close()
            spectra, self._spectra = self._spectra, None
            if spectra is not None:
                spectra.close()


def resolve_bundle(bundle: str | os.PathLike[str] | None, state_dir: Path) -> Path:
    """``--bundle`` if given, else the active model of the state dir's model store."""
    return Path(bundle) if bundle else active_bundle_path(state_dir)
