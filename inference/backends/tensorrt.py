"""TensorRT 10 backend: an FP16 (or FP32) engine built on the device, cached, run with pycuda.

Build (once per engine key, see :mod:`inference.engine_cache`): ``trt.Builder`` ->
``create_network(0)`` (TensorRT 10 networks are always explicit-batch) -> ``trt.OnnxParser`` ->
``BuilderConfig`` (FP16 flag, workspace pool limit, one optimisation profile min/opt/max over the
batch sizes the pipeline uses, a persistent timing cache, optional DLA with GPU fallback,
optional version-compatible plan) -> ``build_serialized_network``.

Run: ``trt.Runtime.deserialize_cuda_engine`` -> ``create_execution_context``; page-locked host
buffers and device buffers sized for ``max_batch`` are allocated once; per call
``set_input_shape``, async host-to-device copy, ``execute_async_v3`` (optionally replayed from a
CUDA graph captured per batch size), async device-to-host copy, one stream synchronise.

TensorRT and pycuda are imported only here, inside :meth:`TensorRTBackend._load`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from firmware_bridge.fsutil import atomic_write_bytes
from inference.backends.base import F32, BackendOptions, InferenceBackend
from inference.bundle import Bundle
from inference.engine_cache import EngineCache, EngineKey
from inference.exceptions import BackendUnavailableError, EngineError
from inference.state_dir import resolve_state_dir

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GpuInfo:
    """What an engine is specific to on the hardware side."""

    name: str
    compute_capability: str


def import_runtime() -> tuple[Any, Any]:
    """``(tensorrt, pycuda.driver)``, or BackendUnavailableError naming what is missing."""
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise BackendUnavailableError(
            f"TensorRT is not installed here ({exc}); on a Jetson it comes with JetPack "
            "(python3-libnvinfer)"
        ) from exc
    try:
        import pycuda.driver as cuda
    except ImportError as exc:
        raise BackendUnavailableError(
            f"pycuda is not installed here ({exc}); install the gpu extra (pycuda==2026.1)"
        ) from exc
    return trt, cuda


def state_dir_of(options: BackendOptions) -> Path:
    """The engine cache's state directory (:func:`inference.state_dir.resolve_state_dir`)."""
    return resolve_state_dir(options.state_dir)


def engine_key(
    bundle: Bundle, trt_version: str, gpu: GpuInfo, options: BackendOptions, precision: str
) -> EngineKey:
    """The cache key of the engine ``options`` describe for ``bundle`` on ``gpu``."""
    _, c, h, w = bundle.manifest.input.shape
    return EngineKey(
        onnx_sha256=bundle.model_sha256,
        trt_version=trt_version,
        gpu_name=gpu.name,
        compute_capability=gpu.compute_capability,
        precision=precision,
        min_shape=(options.min_batch, c, h, w),
        opt_shape=(options.opt_batch, c, h, w),
        max_shape=(options.max_batch, c, h, w),
        dla_core=options.dla_core,
        version_compatible=options.version_compatible,
    )


class _CudaContext:
    """The device's primary context, pushed around every call (the pipeline calls from threads)."""

    def __init__(self, cuda: Any, ordinal: int = 0) -> None:
        self._cuda = cuda
        self._ordinal = ordinal
        self._ctx: Any = None
        self.gpu = GpuInfo("", "")

    def open(self) -> None:
        cuda = self._cuda
        try:
            cuda.init()
            dev = cuda.Device(self._ordinal)
            self._ctx = dev.retain_primary_context()
        except cuda.Error as exc:
            raise BackendUnavailableError(f"no usable CUDA device: {exc}") from exc
        major, minor = dev.compute_capability()
        self.gpu = GpuInfo(str(dev.name()), f"{major}.{minor}")

    def __enter__(self) -> None:
        self._ctx.push()

    def __exit__(self, *exc: object) -> None:
        self._cuda.Context.pop()

    def close(self) -> None:
        if self._ctx is not None:
            self._ctx.detach()
            self._ctx = None


def _apply_options(
    trt: Any, builder: Any, config: Any, options: BackendOptions, precision: str
) -> None:
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, options.workspace_mb << 20)
    if precision == "fp16":
        if not builder.platform_has_fast_fp16:
            raise EngineError("FP16 was asked for but this GPU has no fast FP16; ask for fp32")
        config.set_flag(trt.BuilderFlag.FP16)
    if options.dla_core is not None:
        if builder.num_DLA_cores <= options.dla_core:
            raise BackendUnavailableError(
                f"DLA core {options.dla_core} asked for; this device has {builder.num_DLA_cores}"
            )
        config.default_device_type = trt.DeviceType.DLA
        config.DLA_core = options.dla_core
        # Layers the DLA cannot run go to the GPU instead of failing the build.
        config.set_flag(trt.BuilderFlag.GPU_FALLBACK)
    if options.version_compatible:
        config.set_flag(trt.BuilderFlag.VERSION_COMPATIBLE)


def _parse_onnx(trt: Any, network: Any, logger: Any, onnx_path: Path) -> None:
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_path.read_bytes()):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EngineError(f"TensorRT could not parse {onnx_path}: {errors}")


def build_engine(
    trt: Any,
    bundle: Bundle,
    options: BackendOptions,
    precision: str,
    timing_cache: Path | None,
) -> bytes:
    """Build a serialised engine (a plain plan) for ``bundle`` with the TensorRT 10 builder."""
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    _parse_onnx(trt, network, logger, bundle.model_path)
    config = builder.create_builder_config()
    _apply_options(trt, builder, config, options, precision)
    key = engine_key(bundle, "", GpuInfo("", ""), options, precision)
    profile = builder.create_optimization_profile()
    profile.set_shape(bundle.manifest.input.name, key.min_shape, key.opt_shape, key.max_shape)
    config.add_optimization_profile(profile)
    cache = _load_timing_cache(config, timing_cache)
    log.info("tensorrt: building %s engine for %s (minutes on a Jetson)", precision, bundle.root)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EngineError("TensorRT failed to build the engine (see the TensorRT log above)")
    if timing_cache is not None:
        atomic_write_bytes(timing_cache, bytes(cache.serialize()))
    return bytes(serialized)


def _load_timing_cache(config: Any, path: Path | None) -> Any:
    data = path.read_bytes() if path is not None and path.is_file() else b""
    cache = config.create_timing_cache(data)
    if not config.set_timing_cache(cache, False):
        # A cache from another TensorRT or GPU: start from an empty one instead.
        log.warning("tensorrt: timing cache %s rejected; starting a new one", path)
        cache = config.create_timing_cache(b"")
        config.set_timing_cache(cache, False)
    return cache


class _Execution:
    """One execution context with its buffers, stream and captured graphs."""

    def __init__(
        self,
        trt: Any,
        cuda: Any,
        engine: Any,
        *,
        names: tuple[str, str],
        chw: tuple[int, int, int],
        classes: int,
        options: BackendOptions,
    ) -> None:
        self._cuda = cuda
        self._engine = engine
        self._in, self._out = names
        self._chw = chw
        self._graph = options.cuda_graph
        self._graphs: dict[int, Any] = {}
        _check_io(trt, engine, names)
        self.context = engine.create_execution_context()
        if self.context is None:
            raise EngineError("TensorRT could not create an execution context (out of memory?)")
        self.stream = cuda.Stream()
        self.h_in = cuda.pagelocked_empty((options.max_batch, *chw), np.float32)
        self.h_out = cuda.pagelocked_empty((options.max_batch, classes), np.float32)
        self.d_in = cuda.mem_alloc(self.h_in.nbytes)
        self.d_out = cuda.mem_alloc(self.h_out.nbytes)
        self.context.set_tensor_address(self._in, int(self.d_in))
        self.context.set_tensor_address(self._out, int(self.d_out))

    def run(self, batch: F32) -> F32:
        cuda, n = self._cuda, batch.shape[0]
        self.h_in[:n] = batch
        if not self.context.set_input_shape(self._in, (n, *self._chw)):
            raise EngineError(f"engine rejected input shape {(n, *self._chw)}")
        cuda.memcpy_htod_async(self.d_in, self.h_in[:n], self.stream)
        self._enqueue(n)
        cuda.memcpy_dtoh_async(self.h_out[:n], self.d_out, self.stream)
        self.stream.synchronize()
        return np.array(self.h_out[:n], dtype=np.float32)

    def _enqueue(self, n: int) -> None:
        if not self._graph:
            if not self.context.execute_async_v3(self.stream.handle):
                raise EngineError("execute_async_v3 failed")
            return
        exe = self._graphs.get(n)
        if exe is None:
            # One ordinary enqueue after a shape change lets TensorRT finish its deferred
            # set-up, which must not happen inside the capture.
            if not self.context.execute_async_v3(self.stream.handle):
                raise EngineError("execute_async_v3 failed")
            self.stream.begin_capture()
            self.context.execute_async_v3(self.stream.handle)
            exe = self.stream.end_capture().instantiate()
            self._graphs[n] = exe
        exe.launch(self.stream)

    def close(self) -> None:
        self._graphs.clear()
        self.d_in.free()
        self.d_out.free()
        self.context = None
        self._engine = None


def _check_io(trt: Any, engine: Any, names: tuple[str, str]) -> None:
    io = {engine.get_tensor_name(i) for i in range(engine.num_io_tensors)}
    for name, mode in zip(names, (trt.TensorIOMode.INPUT, trt.TensorIOMode.OUTPUT), strict=True):
        if name not in io or engine.get_tensor_mode(name) != mode:
            raise EngineError(f"engine has no {mode} tensor {name!r} (has {sorted(io)})")
        if engine.get_tensor_dtype(name) != trt.DataType.FLOAT:
            raise EngineError(f"engine tensor {name!r} is not float32")


class TensorRTBackend(InferenceBackend):
    """TensorRT engine from the cache (built when missing), executed with pycuda."""

    name = "tensorrt"
    precisions = ("fp16", "fp32")

    def __init__(self, options: BackendOptions | None = None) -> None:
        super().__init__(options)
        self._trt: Any = None
        self._ctx: _CudaContext | None = None
        self._exec: _Execution | None = None
        self._key: EngineKey | None = None
        self._engine_path = ""
        self._built = False

    def _load(self, bundle: Bundle) -> None:
        trt, cuda = import_runtime()
        self._trt = trt
        self._ctx = _CudaContext(cuda)
        self._ctx.open()
        cache = EngineCache(state_dir_of(self.options))
        key = engine_key(bundle, str(trt.__version__), self._ctx.gpu, self.options, self.precision)
        timing = cache.timing_cache_path(key.trt_version, key.gpu_name)
        m = bundle.manifest
        with self._ctx:
            runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
            if self.options.version_compatible:
                runtime.engine_host_code_allowed = True
            engine, self._built = cache.get_or_build(
                key,
                lambda: build_engine(trt, bundle, self.options, self.precision, timing),
                lambda plan: _deserialize(runtime, plan),
            )
            self._exec = _Execution(
                trt,
                cuda,
                engine,
                names=(m.input.name, m.output.name),
                chw=self.input_chw,
                classes=len(m.classes),
                options=self.options,
            )
        self._key = key
        self._engine_path = str(cache.plan_path(key))

    def _infer(self, batch: F32) -> F32:
        if self._ctx is None or self._exec is None:
            raise EngineError("tensorrt: no engine")
        with self._ctx:
            return self._exec.run(batch)

    def _describe(self) -> dict[str, Any]:
        key = self._key
        return {
            "device": key.gpu_name if key else "",
            "compute_capability": key.compute_capability if key else "",
            "tensorrt": key.trt_version if key else "",
            "engine": self._engine_path,
            "engine_built_now": self._built,
            "dla_core": self.options.dla_core,
            "cuda_graph": self.options.cuda_graph,
        }

    def _close(self) -> None:
        if self._ctx is None:
            return
        if self._exec is not None:
            with self._ctx:
                self._exec.close()
            self._exec = None
        self._ctx.close()
        self._ctx = None


def _deserialize(runtime: Any, plan: bytes) -> Any:
    try:
        engine = runtime.deserialize_cuda_engine(plan)
    except Exception as exc:  # TensorRT raises bare RuntimeError/TypeError from C++
        raise EngineError(f"deserialize_cuda_engine raised: {exc}") from exc
    return engine
