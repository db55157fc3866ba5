"""What a training run's numbers depend on besides data, code and options: ``config.json``.

Same data, code, options, library versions, thread count and machine give the same report
(the run is seeded and uses torch's deterministic algorithms); a different thread count changes
the summation order of every convolution, hence the weights and the figures.
"""

from __future__ import annotations

import os
import platform
from importlib.metadata import PackageNotFoundError, version
from typing import Any

LIBRARIES = ("torch", "numpy", "scipy", "scikit-learn", "onnx", "onnxruntime", "pydantic")


def library_versions() -> dict[str, str | None]:
    """Installed versions of the libraries the figures depend on (None: not installed)."""
    out: dict[str, str | None] = {}
    for name in LIBRARIES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def machine() -> dict[str, Any]:
    """The machine: architecture, processor, CPU count, OS and Python."""
    return {
        "architecture": platform.machine(),
        "processor": platform.processor() or None,
        "cpu_count": os.cpu_count(),
        "system": platform.platform(),
        "python": platform.python_version(),
    }


def environment_record(threads: dict[str, Any]) -> dict[str, Any]:
    """``config.json``'s ``environment``: thread settings, determinism, libraries, machine."""
    return {**threads, "libraries": library_versions(), "machine": machine()}
