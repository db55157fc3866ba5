"""Shared test set-up: GPU-marked tests run only where pycuda and a CUDA GPU are usable."""

from __future__ import annotations

import functools

import pytest

GPU_SKIP_REASON = "no usable CUDA GPU / pycuda"


@functools.cache
def cuda_gpu_usable() -> bool:
    """True when pycuda imports and the CUDA driver sees at least one GPU."""
    try:
        import pycuda.driver as cuda
    except ImportError:
        return False
    try:
        cuda.init()
        return int(cuda.Device.count()) > 0
    except cuda.Error:
        return False


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip (report as not run) every ``@pytest.mark.gpu`` test where no GPU is usable."""
    gpu_items = [item for item in items if item.get_closest_marker("gpu") is not None]
    if not gpu_items or cuda_gpu_usable():
        return
    skip = pytest.mark.skip(reason=GPU_SKIP_REASON)
    for item in gpu_items:
        item.add_marker(skip)
