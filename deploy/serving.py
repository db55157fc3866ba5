"""The model the appliance serves: backends opened once, a new model loaded beside the old one.

:class:`ModelServer` opens the spectrum backend once (:meth:`open`) and an inference backend per
model: at start-up, when OTA prepares a new bundle (:meth:`prepare`, golden-gated beside the
serving one), and when the model store's active model changes under it (:meth:`follow_store`,
e.g. ``omis ota rollback`` from another process).  Never per slide.  Each opening is logged once
at INFO (:mod:`inference.opening`).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deploy.config import InferenceConfig
from deploy.exceptions import ScanError
from inference.backends.base import BackendOptions, InferenceBackend
from inference.bundle import Bundle
from inference.pipeline import PipelineConfig, SlidePipeline
from inference.spectrum import SpectrumBackend

log = logging.getLogger(__name__)


def active_bundle_path(state_dir: Path) -> Path:
    """Directory of the model store's active model (``current`` in ``models/state.json``)."""
    from deploy.ota.store import ModelStore

    store = ModelStore(state_dir)
    current = store.read_state().current
    if current is None:
        raise ScanError(f"no active model in {store.root}; install one or pass --bundle")
    return store.bundle_path(current)


@dataclass
class Served:
    """One loaded model: bundle, golden-checked backend, pipeline, store generation."""

    bundle: Bundle
    backend: InferenceBackend
    pipeline: SlidePipeline
    generation: int | None = None

    def close(self) -> None:
        """Close the backend."""
        self.backend.close()


class ModelServer:
    """Serves one model at a time; ``bundle_path=None`` follows the state dir's model store."""

    def __init__(
        self,
        bundle_path: Path | None,
        state_dir: Path,
        inference: InferenceConfig,
        allow_empty: bool = False,
        min_usable_fields: int = 1,
    ) -> None:
        self.bundle_path = bundle_path
        self.min_usable_fields = min_usable_fields
        self.allow_empty = allow_empty  # an empty store waits for its first model (first boot)
        self.state_dir = state_dir
        self.inference = inference
        self.served: Served | None = None
        self._spectra: SpectrumBackend | None = None
        self._prepared: Served | None = None
        self._prepare_lock = threading.Lock()

    @property
    def follows_store(self) -> bool:
        """True when the model comes from the model store (no pinned ``--bundle``)."""
        return self.bundle_path is None

    def open(self) -> Served | None:
        """Open the spectrum backend, then load and golden-gate the model (None: the store is
        empty and ``allow_empty``: the first model will come over OTA)."""
        from inference.bundle import load_bundle
        from inference.opening import open_spectrum_backend

        if self._spectra is None:
            self._spectra = open_spectrum_backend(self.inference.spectrum_backend)
        if self.bundle_path is None:
            if self.allow_empty and self._store_is_empty():
                log.warning("no model installed in %s yet: waiting for one (OTA)", self.state_dir)
                return None
            bundle, generation = self._store_model()
            self.served = self._open_model(bundle, generation)
        else:
            self.served = self._open_model(load_bundle(self.bundle_path), None)
        return self.served

    def options(self) -> BackendOptions:
        """The backend options of the ``inference:`` configuration."""
        cfg = self.inference
        return BackendOptions(
            precision=cfg.precision,
            max_batch=cfg.max_batch,
            opt_batch=cfg.opt_batch,
            state_dir=str(self.state_dir),
            provider=cfg.ort_provider,
            device=cfg.device,
        )

    def _open_model(self, bundle: Bundle, generation: int | None) -> Served:
        from inference.opening import open_inference_backend

        if self._spectra is None:
            raise ScanError("the spectrum backend is not open")
        backend = open_inference_backend(
            self.inference.backend, bundle, self.options(), spectra=self._spectra
        )
        try:
            pipeline = SlidePipeline(
                bundle,
                backend,
                PipelineConfig(
                    spectrum_backend=self._spectra, min_usable_fields=self.min_usable_fields
                ),
            )
        except BaseException:
            backend.close()
            raise
        return Served(bundle, backend, pipeline, generation)

    def _store_is_empty(self) -> bool:
        from deploy.ota.store import ModelStore

        return ModelStore(self.state_dir).read_state().current is None

    def _store_model(self) -> tuple[Bundle, int]:
        from deploy.ota.store import ModelStore

        store = ModelStore(self.state_dir)
        state = store.read_state()  # one read: the bundle and its generation agree
        if state.current is None:
            raise ScanError(f"no active model in {store.root}; install one or pass --bundle")
        return store.open_slot(state.current), state.generation

    def describe(self) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
        """``(model, engine)`` of the model serving now."""
        served = self.served
        if served is None:
            return None, None
        return dict(served.bundle.describe()), served.backend.describe()

    # -- switching (OTA) -----------------------------------------------------------------------

    def prepare(self, bundle: Bundle) -> None:
        """Load ``bundle`` beside the serving model and pass its golden gate; keep it ready."""
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

    def switch(self, bundle: Bundle, generation: int | None) -> None:
        """Serve ``bundle`` from the next slide on (prepared, else loaded now); on failure the
        serving model stays."""
        served = self.served
        if served is not None and served.bundle.manifest_bytes == bundle.manifest_bytes:
            served.generation = generation  # already serving it (e.g. a rollback of a refusal)
            return
        with self._prepare_lock:
            ready, self._prepared = self._prepared, None
        if ready is None or ready.bundle.manifest_bytes != bundle.manifest_bytes:
            if ready is not None:
                ready.close()
            ready = self._open_model(bundle, generation)
        ready.generation = generation
        self.served = ready
        if served is not None:
            served.close()
        log.info("now serving %s", bundle.describe())

    def unload(self) -> None:
        """Stop serving (the store has no model): scans are refused until one comes."""
        served, self.served = self.served, None
        if served is not None:
            log.warning("no model serves any more (%s v%s unloaded)", *_name(served))
            served.close()

    def follow_store(self) -> None:
        """Reload at a slide boundary when another process switched the store's model."""
        from deploy.ota.store import ModelStore

        served = self.served
        if not self.follows_store or (served is None and self._store_is_empty()):
            return
        if served is not None and ModelStore(self.state_dir).generation() == served.generation:
            return
        bundle, generation = self._store_model()
        was = None if served is None else served.generation
        log.info("model store changed (generation %s -> %d): reloading", was, generation)
        self.switch(bundle, generation)

    def close(self) -> None:
        """Close the prepared and serving models and the spectrum backend (idempotent)."""
        served, self.served = self.served, None
        spectra, self._spectra = self._spectra, None
        try:
            self.discard_prepared()
            if served is not None:
                served.close()
        finally:
            if spectra is not None:
                spectra.close()


def _name(served: Served) -> tuple[str, int]:
    m = served.bundle.manifest
    return m.name, m.version
