"""The pycuda half of the TensorRT backend on a real GPU (``-m gpu``).

TensorRT itself is not installable on the lent GPU machines, so the engine is replaced by an
identity "engine" whose enqueue is a real device-to-device copy on the backend's stream.  What
runs for real: the primary context pushed from several threads, page-locked host buffers,
device buffers, async copies on one stream, and CUDA graph capture and replay.
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
import pytest

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def cuda() -> Any:
    try:
        import pycuda.driver as drv
    except ImportError as exc:
        pytest.skip(f"pycuda not installed: {exc}")
    try:
        drv.init()
        if drv.Device.count() == 0:
            pytest.skip("no CUDA device")
    except drv.Error as exc:
        pytest.skip(f"no usable CUDA driver: {exc}")
    return drv


class _IdentityEngine:
    """Copies the input to the output (first C*H*W floats of each row cut to K classes)."""

    num_io_tensors = 2

    def __init__(self, cuda: Any, k: int) -> None:
        self.cuda = cuda
        self.k = k

    def get_tensor_name(self, i: int) -> str:
        return ("input", "probabilities")[i]

    def get_tensor_mode(self, name: str) -> str:
        return "INPUT" if name == "input" else "OUTPUT"

    def get_tensor_dtype(self, name: str) -> str:
        return "FLOAT"

    def create_execution_context(self) -> Any:
        return _IdentityContext(self)


class _IdentityContext:
    def __init__(self, engine: _IdentityEngine) -> None:
        self.engine = engine
        self.addr: dict[str, int] = {}
        self.shape: tuple[int, ...] = ()
        self.stream: Any = None

    def set_tensor_address(self, name: str, addr: int) -> None:
        self.addr[name] = addr

    def set_input_shape(self, name: str, shape: tuple[int, ...]) -> bool:
        self.shape = shape
        return True

    def execute_async_v3(self, handle: int) -> bool:
        chw = int(np.prod(self.shape[1:]))
        for row in range(self.shape[0]):
            self.engine.cuda.memcpy_dtod_async(
                self.addr["probabilities"] + row * self.engine.k * 4,
                self.addr["input"] + row * chw * 4,
                self.engine.k * 4,
                self.stream,
            )
        return True


class _Trt:
    class TensorIOMode:
        INPUT = "INPUT"
        OUTPUT = "OUTPUT"

    class DataType:
        FLOAT = "FLOAT"


@pytest.mark.parametrize("graph", [False, True])
def test_pinned_buffers_async_copies_and_graphs(cuda: Any, graph: bool) -> None:
    from inference.backends.base import BackendOptions
    from inference.backends.tensorrt import _CudaContext, _Execution

    ctx = _CudaContext(cuda)
    ctx.open()
    assert ctx.gpu.name and "." in ctx.gpu.compute_capability
    engine = _IdentityEngine(cuda, k=5)
    with ctx:
        exe = _Execution(
            _Trt,
            cuda,
            engine,
            names=("input", "probabilities"),
            chw=(3, 8, 8),
            classes=5,
            options=BackendOptions(max_batch=4, cuda_graph=graph),
        )
        exe.context.stream = exe.stream
    try:
        rng = np.random.default_rng(0)
        results: list[bool] = []

        def worker() -> None:  # the pipeline calls infer from its own thread
            for n in (1, 4, 2, 4):
                x = rng.normal(size=(n, 3, 8, 8)).astype(np.float32)
                with ctx:
                    out = exe.run(x)
                results.append(bool(np.array_equal(out, x.reshape(n, -1)[:, :5])))

        t = threading.Thread(target=worker)
        t.start()
        t.join()
        assert results == [True] * 4
        assert len(exe._graphs) == (3 if graph else 0)
    finally:
        with ctx:
            exe.close()
        ctx.close()
