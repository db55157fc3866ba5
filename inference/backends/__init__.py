"""Inference backends selected by name: ``tensorrt``, ``onnxruntime``, ``torch`` or ``auto``.

Modules are imported lazily from :data:`BACKEND_MODULES`, so ``import inference.backends`` never
imports TensorRT, pycuda or torch.  ``auto`` picks TensorRT when it is usable here, else ONNX
Runtime; the choice shows in ``describe()``: ``name`` runs, ``requested`` is ``auto`` and
``skipped`` says why each earlier candidate was passed over.  A backend asked for by name that
cannot start raises :class:`BackendUnavailableError`: never a silent switch to another one.
"""

from __future__ import annotations

import importlib
import logging

from inference.backends.base import BackendOptions, InferenceBackend, Precision
from inference.bundle import Bundle
from inference.exceptions import BackendUnavailableError, InferenceError

log = logging.getLogger(__name__)

# name -> "module:Class"; imported only when asked for.
BACKEND_MODULES: dict[str, str] = {
    "tensorrt": "inference.backends.tensorrt:TensorRTBackend",
    "onnxruntime": "inference.backends.onnxruntime:OnnxRuntimeBackend",
    "torch": "inference.backends.torch:TorchBackend",
}
AUTO_ORDER = ("tensorrt", "onnxruntime")
BACKEND_NAMES = ("auto", *BACKEND_MODULES)

__all__ = [
    "AUTO_ORDER",
    "BACKEND_MODULES",
    "BACKEND_NAMES",
    "BackendOptions",
    "InferenceBackend",
    "Precision",
    "backend_class",
    "load_backend",
]


def backend_class(name: str) -> type[InferenceBackend]:
    """The class registered under ``name`` (imports its module, not its heavy dependencies)."""
    try:
        target = BACKEND_MODULES[name]
    except KeyError:
        raise InferenceError(
            f"unknown inference backend {name!r}; choose one of {', '.join(BACKEND_NAMES)}"
        ) from None
    module_name, _, cls_name = target.partition(":")
    cls: type[InferenceBackend] = getattr(importlib.import_module(module_name), cls_name)
    return cls


def _load_named(name: str, bundle: Bundle, options: BackendOptions) -> InferenceBackend:
    backend = backend_class(name)(options)
    try:
        backend.load(bundle)
    except BaseException:
        backend.close()
        raise
    return backend


def load_backend(
    name: str, bundle: Bundle, options: BackendOptions | None = None
) -> InferenceBackend:
    """Open the named backend and load ``bundle`` into it (no golden check: see golden.py)."""
    opts = options or BackendOptions()
    if name != "auto":
        return _load_named(name, bundle, opts)
    reasons: list[str] = []
    for candidate in AUTO_ORDER:
        try:
            backend = _load_named(candidate, bundle, opts)
        except BackendUnavailableError as exc:
            log.debug("inference backend auto: %s not usable (%s)", candidate, exc)
            reasons.append(f"{candidate}: {exc}")
            continue
        backend.mark_selected("auto", tuple(reasons))
        return backend
    raise BackendUnavailableError("no inference backend usable here: " + "; ".join(reasons))
