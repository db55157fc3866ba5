"""Opening the two backends of the device path, once, each logged once at INFO.

A scan run (``omis scan``), the daemon (``omis serve``) and a model change open backends; a
slide never does.  :func:`open_spectrum_backend` picks the spectrum backend (``auto`` prefers
CUDA) and :func:`open_inference_backend` loads, warms up and golden-gates the inference backend;
each logs one line saying what was chosen and why.  Asking for a backend by name that cannot
start raises :class:`~inference.exceptions.BackendUnavailableError`: never a silent switch.
"""

from __future__ import annotations

import logging

from inference.backends.base import BackendOptions, InferenceBackend
from inference.bundle import Bundle
from inference.exceptions import BackendUnavailableError
from inference.spectrum import SpectrumBackend, open_backend

log = logging.getLogger(__name__)


def open_spectrum_backend(name: str = "auto") -> SpectrumBackend:
    """Open the spectrum backend ``name`` (``auto``, ``numpy`` or ``cuda``) and log the choice."""
    if name != "auto":
        backend = open_backend(name)
        log.info("spectrum backend %s opened (asked for by name)", backend.name)
        return backend
    try:
        backend = open_backend("cuda")
        why = "auto: CUDA is usable"
    except BackendUnavailableError as exc:
        backend = open_backend("numpy")
        why = f"auto: CUDA not usable: {exc}"
    log.info("spectrum backend %s opened (%s)", backend.name, why)
    return backend


def open_inference_backend(
    name: str, bundle: Bundle, options: BackendOptions | None = None
) -> InferenceBackend:
    """Load, warm up and golden-gate the inference backend ``name`` for ``bundle``; log it."""
    from inference.golden import open_checked

    backend, _ = open_checked(name, bundle, options)
    described = backend.describe()
    skipped = described.get("skipped") or ()
    why = "asked for by name" if name != "auto" else "auto"
    if skipped:
        why += "; skipped " + "; ".join(str(s) for s in skipped)
    log.info(
        "inference backend %s %s opened for %s v%s (%s)",
        described.get("name"),
        described.get("precision"),
        bundle.manifest.name,
        bundle.manifest.version,
        why,
    )
    return backend
