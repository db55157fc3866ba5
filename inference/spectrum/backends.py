"""Spectrum backends behind one small seam, selected by name.

``numpy`` always works; ``cuda`` needs pycuda and a usable GPU.  ``auto`` picks ``cuda`` when it
is usable, else ``numpy``, and every spectrum records the backend that produced it.  A backend
asked for by name that cannot start raises :class:`BackendUnavailableError`: never a silent
switch to another one.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Sequence
from typing import Protocol

from inference.exceptions import BackendUnavailableError, SpectrumInputError
from inference.spectrum.params import RbhistParams, WdiffParams
from inference.spectrum.types import Histogram, Spectrum, finalize
from inference.spectrum.validate import U8, Mask

log = logging.getLogger(__name__)

Params = WdiffParams | RbhistParams
FieldPair = tuple[U8, U8]


class SpectrumBackend(Protocol):
    """Accumulates the integer histogram of one W/P field pair."""

    name: str

    def histogram(self, w: U8, p: U8, params: Params, mask: Mask | None = None) -> Histogram:
        """The exact integer histogram of one field (see ``docs/spectrum.md``)."""
        ...

    def close(self) -> None:
        """Release buffers; idempotent."""
        ...


class NumpyBackend:
    """The vectorised CPU backend."""

    name = "numpy"

    def __init__(self, threads: int | None = None) -> None:
        self._threads = threads

    def histogram(self, w: U8, p: U8, params: Params, mask: Mask | None = None) -> Histogram:
        """Histogram of one field on the CPU."""
        from inference.spectrum.cpu import numpy_histogram

        return numpy_histogram(w, p, params, mask, threads=self._threads)

    def close(self) -> None:
        """Nothing to release."""


def _make_numpy() -> SpectrumBackend:
    return NumpyBackend()


def _make_cuda() -> SpectrumBackend:
    try:
        module = importlib.import_module("inference.spectrum.cuda")
    except ImportError as exc:  # a broken install must not look like "no GPU"
        raise BackendUnavailableError(f"CUDA spectrum backend cannot be imported: {exc}") from exc
    backend: SpectrumBackend = module.CudaBackend()
    return backend


_FACTORIES = {"numpy": _make_numpy, "cuda": _make_cuda}
BACKENDS = ("auto", *_FACTORIES)


def open_backend(name: str = "auto") -> SpectrumBackend:
    """Open a spectrum backend by name; ``auto`` prefers CUDA when it is usable."""
    if name == "auto":
        try:
            return _make_cuda()
        except BackendUnavailableError as exc:
            log.info("spectrum backend auto: CUDA not usable (%s); using numpy", exc)
            return _make_numpy()
    try:
        factory = _FACTORIES[name]
    except KeyError:
        raise SpectrumInputError(
            f"unknown spectrum backend {name!r}; choose one of {', '.join(BACKENDS)}"
        ) from None
    return factory()


def open_spectrum_backend(name: str = "auto") -> SpectrumBackend:
    """Open the spectrum backend ``name`` (``auto``, ``numpy`` or ``cuda``) and log the choice."""
    if name != "auto":
        backend = open_backend(name)
        log.info("spectrum backend %s opened (asked for by name)", backend.name)
        return backend
    try:
        backend = _make_cuda()
        why = "auto: CUDA is usable"
    except BackendUnavailableError as exc:
        backend = _make_numpy()
        why = f"auto: CUDA not usable: {exc}"
    log.info("spectrum backend %s opened (%s)", backend.name, why)
    return backend


def slide_histogram(
    backend: SpectrumBackend,
    fields: Sequence[FieldPair],
    params: Params,
    masks: Sequence[Mask | None] | None = None,
) -> Histogram:
    """Sum of the field histograms of one slide (exactly one histogram over all pixels)."""
    if not fields:
        raise SpectrumInputError("no fields given")
    if masks is not None and len(masks) != len(fields):
        raise SpectrumInputError(f"{len(masks)} masks for {len(fields)} fields")
    total = Histogram.empty(params)
    for i, (w, p) in enumerate(fields):
        mask = None if masks is None else masks[i]
        try:
            total = total + backend.histogram(w, p, params, mask)
        except SpectrumInputError as exc:
            raise SpectrumInputError(f"field {i}: {exc}") from exc
    return total


def compute_spectrum(
    fields: Sequence[FieldPair],
    params: Params,
    masks: Sequence[Mask | None] | None = None,
    backend: str | SpectrumBackend = "auto",
) -> Spectrum:
    """The spectrum of one slide (one or more fields), on the named or given backend."""
    if isinstance(backend, str):
        opened = open_backend(backend)
        try:
            h = slide_histogram(opened, fields, params, masks)
        finally:
            opened.close()
        return finalize(h, params, opened.name)
    return finalize(slide_histogram(backend, fields, params, masks), params, backend.name)
