"""Opening the two backends of the device path, once, each logged once at INFO.

A scan run (``omis scan``), the daemon (``omis serve``) and a model change open backends; a
slide never does.  :func:`open_spectrum_backend` picks the spectrum backend (``auto`` prefers
CUDA) and :func:`open_inference_backend` loads, warms up and golden-gates the inference backend;
each logs one line saying what was chosen and why.  The golden gate of every model is handed
the opened spectrum backend, so it proves the one that serves and opens nothing itself.
Asking for a backend by name that cannot start raises
:class:`~inference.exceptions.BackendUnavailableError`: never a silent switch.
"""

from __future__ import annotations

import logging

from inference.backends.base import BackendOptions, InferenceBackend
from inference.bundle import Bundle
from inference.spectrum import SpectrumBackend
from inference.spectrum.backends import open_spectrum_backend

log = logging.getLogger(__name__)

__all__ = ["open_inference_backend", "open_spectrum_backend"]


def open_inference_backend(
    name: str,
    bundle: Bundle,
    options: BackendOptions | None = None,
    *,
    spectra: SpectrumBackend | str = "auto",
) -> InferenceBackend:
    """Load, warm up and golden-gate the inference backend ``name`` for ``bundle``; log it.

    The gate replays the golden field pairs through ``spectra``.  A server passes the spectrum
    backend it serves with (opened once per run by :func:`open_spectrum_backend`), so the gate
    proves that one and opens none of its own; a name opens one for this check only.
    """
    from inference.golden import open_checked

    backend, _ = open_checked(name, bundle, options, spectrum_backend=spectra)
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
