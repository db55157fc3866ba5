"""A stand-in for the ``tensorrt`` (10.x) and ``pycuda.driver`` surfaces the backend uses.

It is a strict fake: any attribute of the modules or objects that the backend is not expected to
touch raises AssertionError (so a change in how the backend calls TensorRT shows up here), and
the recorded calls let tests check the builder configuration.  "Device memory" is host memory
keyed by fake addresses; an engine is a plan of ``MAGIC + JSON header + ONNX bytes`` and runs
the ONNX with ONNX Runtime, rounding through float16 when built with the FP16 flag.  A plan
without the magic or from another "TensorRT version" deserialises to None, as real TensorRT does.

Use :func:`install` (with pytest's monkeypatch) to put both modules into ``sys.modules``.
"""

from __future__ import annotations

import functools
import itertools
import json
import sys
import types
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnxruntime as ort

MAGIC = b"FAKETRT\x01"
VERSION = "10.3.0"


@dataclass
class Knobs:
    """What tests may change, and what the fake records."""

    fp16_error: float = 0.0  # added to class 0 of FP16 engines (renormalised), to fail the gate
    fast_fp16: bool = True
    dla_cores: int = 0
    builds: int = 0
    deserialize_calls: int = 0
    executes: int = 0
    graph_launches: int = 0
    flags: list[str] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    profiles: list[tuple[str, tuple[int, ...], tuple[int, ...], tuple[int, ...]]] = field(
        default_factory=list
    )
    pushes: int = 0
    pops: int = 0
    allocated: int = 0
    freed: int = 0


KNOBS = Knobs()


class _Strict:
    """Unknown attribute reads fail loudly; only names in _SETTABLE may be assigned."""

    _SETTABLE: frozenset[str] = frozenset()

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"fake tensorrt: unexpected use of {type(self).__name__}.{name}")

    def __setattr__(self, name: str, value: Any) -> None:
        if not name.startswith("_") and name not in self._SETTABLE:
            raise AssertionError(f"fake tensorrt: unexpected set of {type(self).__name__}.{name}")
        object.__setattr__(self, name, value)


# --------------------------------------------------------------------------- pycuda.driver ----

_MEMORY: dict[int, np.ndarray] = {}
_ADDR = itertools.count(0x10000, 0x10000)


class CudaError(Exception):
    """pycuda.driver.Error."""


class DeviceAllocation(_Strict):
    def __init__(self, nbytes: int) -> None:
        self._addr = next(_ADDR)
        _MEMORY[self._addr] = np.zeros(nbytes, np.uint8)
        KNOBS.allocated += 1

    def __int__(self) -> int:
        return self._addr

    def free(self) -> None:
        _MEMORY.pop(self._addr, None)
        KNOBS.freed += 1


class Graph(_Strict):
    def __init__(self, ops: list[Any]) -> None:
        self._ops = ops

    def instantiate(self) -> GraphExec:
        return GraphExec(self._ops)


class GraphExec(_Strict):
    def __init__(self, ops: list[Any]) -> None:
        self._ops = ops

    def launch(self, stream: Stream) -> None:
        KNOBS.graph_launches += 1
        for op in self._ops:
            op()


class Stream(_Strict):
    def __init__(self) -> None:
        self._handle = next(_ADDR)
        self._capture: list[Any] | None = None

    @property
    def handle(self) -> int:
        return self._handle

    def synchronize(self) -> None:
        """Work runs eagerly in the fake, so there is nothing to wait for."""

    def begin_capture(self) -> None:
        assert self._capture is None, "capture already in progress"
        self._capture = []

    def end_capture(self) -> Graph:
        assert self._capture is not None, "end_capture without begin_capture"
        ops, self._capture = self._capture, None
        return Graph(ops)


_STREAMS: dict[int, Stream] = {}


def _stream(handle: int) -> Stream:
    return _STREAMS[handle]


def _new_stream() -> Stream:
    s = Stream()
    _STREAMS[s.handle] = s
    return s


def _buf(addr: int) -> np.ndarray:
    return _MEMORY[addr]


def memcpy_htod_async(dest: DeviceAllocation, src: np.ndarray, stream: Stream) -> None:
    raw = np.ascontiguousarray(src).view(np.uint8).reshape(-1)
    _buf(int(dest))[: raw.size] = raw


def memcpy_dtoh_async(dest: np.ndarray, src: DeviceAllocation, stream: Stream) -> None:
    assert dest.flags.c_contiguous, "dtoh into a non-contiguous host view"
    dest.view(np.uint8).reshape(-1)[:] = _buf(int(src))[: dest.nbytes]


class Context(_Strict):
    @staticmethod
    def pop() -> None:
        KNOBS.pops += 1


class PrimaryContext(_Strict):
    def push(self) -> None:
        KNOBS.pushes += 1

    def detach(self) -> None:
        """Released."""


class Device(_Strict):
    def __init__(self, ordinal: int) -> None:
        assert ordinal == 0

    def name(self) -> str:
        return "Fake Orin (stand-in)"

    def compute_capability(self) -> tuple[int, int]:
        return (8, 7)

    def retain_primary_context(self) -> PrimaryContext:
        return PrimaryContext()


# ------------------------------------------------------------------------------- tensorrt ----


class Logger(_Strict):
    WARNING = 2

    def __init__(self, severity: int) -> None:
        pass


class MemoryPoolType:
    WORKSPACE = "WORKSPACE"


class BuilderFlag:
    FP16 = "FP16"
    GPU_FALLBACK = "GPU_FALLBACK"
    VERSION_COMPATIBLE = "VERSION_COMPATIBLE"


class DeviceType:
    GPU = "GPU"
    DLA = "DLA"


class TensorIOMode:
    INPUT = "INPUT"
    OUTPUT = "OUTPUT"


class DataType:
    FLOAT = "FLOAT"


class NetworkDefinition(_Strict):
    def __init__(self) -> None:
        self._onnx: bytes | None = None


class OnnxParser(_Strict):
    def __init__(self, network: NetworkDefinition, logger: Logger) -> None:
        self._network = network
        self._errors: list[str] = []

    def parse(self, data: bytes) -> bool:
        try:
            ort.InferenceSession(data, providers=["CPUExecutionProvider"])
        except Exception as exc:
            self._errors.append(str(exc).splitlines()[0])
            return False
        self._network._onnx = data
        return True

    @property
    def num_errors(self) -> int:
        return len(self._errors)

    def get_error(self, i: int) -> str:
        return self._errors[i]


class OptimizationProfile(_Strict):
    def set_shape(self, name: str, mn: Any, opt: Any, mx: Any) -> None:
        KNOBS.profiles.append((name, tuple(mn), tuple(opt), tuple(mx)))


class TimingCache(_Strict):
    def __init__(self, data: bytes) -> None:
        self._data = data or b"timing:"

    def serialize(self) -> bytes:
        return self._data + b"+"


class BuilderConfig(_Strict):
    _SETTABLE = frozenset({"default_device_type", "DLA_core"})

    def __init__(self) -> None:
        self._flags: set[str] = set()

    def set_memory_pool_limit(self, pool: str, size: int) -> None:
        KNOBS.config[pool] = size

    def set_flag(self, flag: str) -> None:
        self._flags.add(flag)
        KNOBS.flags.append(flag)

    def __setattr__(self, name: str, value: Any) -> None:
        super().__setattr__(name, value)
        if not name.startswith("_"):
            KNOBS.config[name] = value

    def create_timing_cache(self, data: bytes) -> TimingCache:
        return TimingCache(bytes(data))

    def set_timing_cache(self, cache: TimingCache, ignore_mismatch: bool) -> bool:
        return cache._data.startswith(b"timing:")

    def add_optimization_profile(self, profile: OptimizationProfile) -> int:
        return 0


class Builder(_Strict):
    def __init__(self, logger: Logger) -> None:
        pass

    @property
    def platform_has_fast_fp16(self) -> bool:
        return KNOBS.fast_fp16

    @property
    def num_DLA_cores(self) -> int:  # noqa: N802 - TensorRT's spelling
        return KNOBS.dla_cores

    def create_network(self, flags: int) -> NetworkDefinition:
        assert flags == 0, "TensorRT 10: explicit batch is implied, flags must be 0"
        return NetworkDefinition()

    def create_builder_config(self) -> BuilderConfig:
        return BuilderConfig()

    def create_optimization_profile(self) -> OptimizationProfile:
        return OptimizationProfile()

    def build_serialized_network(self, network: NetworkDefinition, config: BuilderConfig) -> bytes:
        assert network._onnx is not None, "build before a successful parse"
        KNOBS.builds += 1
        header = {"version": VERSION, "fp16": "FP16" in config._flags}
        return MAGIC + json.dumps(header).encode() + b"\n" + network._onnx


class ExecutionContext(_Strict):
    def __init__(self, engine: CudaEngine) -> None:
        self._engine = engine
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._addr: dict[str, int] = {}

    def set_input_shape(self, name: str, shape: tuple[int, ...]) -> bool:
        assert name == self._engine._input
        self._shapes[name] = tuple(shape)
        return True

    def set_tensor_address(self, name: str, addr: int) -> None:
        assert isinstance(addr, int)
        self._addr[name] = addr

    def execute_async_v3(self, stream_handle: int) -> bool:
        stream = _stream(stream_handle)
        shape = self._shapes[self._engine._input]
        op = functools.partial(self._run, shape)  # the shape is captured for graph replay
        if stream._capture is not None:
            stream._capture.append(op)
        else:
            op()
        return True

    def _run(self, shape: tuple[int, ...]) -> None:
        KNOBS.executes += 1
        e = self._engine
        n = int(np.prod(shape))
        x = _buf(self._addr[e._input])[: n * 4].view(np.float32).reshape(shape)
        if e._fp16:
            x = x.astype(np.float16).astype(np.float32)
        (y,) = e._session.run([e._output], {e._input: x})
        y = np.asarray(y, np.float32)
        if e._fp16:
            y = y.astype(np.float16).astype(np.float32)
            # A wrong FP16 engine still outputs probabilities (rows sum to 1), just wrong ones.
            y[:, 0] += np.float32(KNOBS.fp16_error)
            y /= y.sum(axis=1, keepdims=True)
        raw = y.view(np.uint8).reshape(-1)
        _buf(self._addr[e._output])[: raw.size] = raw


class CudaEngine(_Strict):
    def __init__(self, onnx_bytes: bytes, fp16: bool) -> None:
        self._session = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
        self._input = self._session.get_inputs()[0].name
        self._output = self._session.get_outputs()[0].name
        self._fp16 = fp16

    @property
    def num_io_tensors(self) -> int:
        return 2

    def get_tensor_name(self, i: int) -> str:
        return str((self._input, self._output)[i])

    def get_tensor_mode(self, name: str) -> str:
        return TensorIOMode.INPUT if name == self._input else TensorIOMode.OUTPUT

    def get_tensor_dtype(self, name: str) -> str:
        return DataType.FLOAT

    def create_execution_context(self) -> ExecutionContext:
        return ExecutionContext(self)


class Runtime(_Strict):
    _SETTABLE = frozenset({"engine_host_code_allowed"})

    def __init__(self, logger: Logger) -> None:
        pass

    def deserialize_cuda_engine(self, plan: bytes) -> CudaEngine | None:
        KNOBS.deserialize_calls += 1
        data = bytes(plan)
        if not data.startswith(MAGIC):
            return None  # TensorRT logs "magic tag does not match" and returns None
        header, _, onnx_bytes = data[len(MAGIC) :].partition(b"\n")
        meta = json.loads(header)
        if meta["version"] != VERSION:
            return None
        return CudaEngine(onnx_bytes, meta["fp16"])


# --------------------------------------------------------------------------- the modules ----


def _strict_module(name: str, members: dict[str, Any]) -> types.ModuleType:
    module = types.ModuleType(name)
    for k, v in members.items():
        setattr(module, k, v)

    def __getattr__(attr: str) -> Any:  # noqa: N807 - module-level hook
        raise AssertionError(f"fake {name}: unexpected use of {name}.{attr}")

    module.__getattr__ = __getattr__  # type: ignore[method-assign]
    return module


def trt_module() -> types.ModuleType:
    """The fake ``tensorrt`` module."""
    return _strict_module(
        "tensorrt",
        {
            "__version__": VERSION,
            "Logger": Logger,
            "Builder": Builder,
            "OnnxParser": OnnxParser,
            "BuilderFlag": BuilderFlag,
            "MemoryPoolType": MemoryPoolType,
            "DeviceType": DeviceType,
            "TensorIOMode": TensorIOMode,
            "DataType": DataType,
            "Runtime": Runtime,
        },
    )


def cuda_module() -> types.ModuleType:
    """The fake ``pycuda.driver`` module."""
    return _strict_module(
        "pycuda.driver",
        {
            "Error": CudaError,
            "init": lambda: None,
            "Device": Device,
            "Context": Context,
            "Stream": _new_stream,
            "mem_alloc": DeviceAllocation,
            "pagelocked_empty": np.zeros,
            "memcpy_htod_async": memcpy_htod_async,
            "memcpy_dtoh_async": memcpy_dtoh_async,
        },
    )


def install(monkeypatch: Any) -> Knobs:
    """Put fresh fake ``tensorrt`` and ``pycuda.driver`` modules in sys.modules; reset knobs."""
    KNOBS.__dict__.update(Knobs().__dict__)  # reset in place: the fake's classes read KNOBS
    driver = cuda_module()
    pycuda = types.ModuleType("pycuda")
    pycuda.driver = driver  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "tensorrt", trt_module())
    monkeypatch.setitem(sys.modules, "pycuda", pycuda)
    monkeypatch.setitem(sys.modules, "pycuda.driver", driver)
    return KNOBS
