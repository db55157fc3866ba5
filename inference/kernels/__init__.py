"""CUDA C sources shipped as package data (compiled at run time by the CUDA backends)."""

from __future__ import annotations

from importlib import resources


def read_kernel(name: str) -> str:
    """The text of the kernel source file ``name`` shipped in this package."""
    return resources.files(__name__).joinpath(name).read_text(encoding="utf-8")
