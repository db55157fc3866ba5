"""The CUDA spectrum backend: ``inference/kernels/omis_spectrum.cu`` launched through pycuda.

The kernel accumulates ``hist`` and ``count`` with integer atomics only, so its histograms are
bit-identical to the CPU backends (see the design notes at the top of the ``.cu`` file).

pycuda is imported inside :class:`CudaBackend`, never at module level: ``import
inference.spectrum.cuda`` works on any machine, and constructing the backend raises
:class:`BackendUnavailableError` with the reason when pycuda, the driver, a GPU or the compiler
is missing.

Host memory follows the GPU's kind:

* integrated GPUs (Jetson), where CPU and GPU share DRAM: inputs live in mapped page-locked
  host memory that the kernel reads in place (zero-copy, no upload);
* discrete GPUs: inputs are staged in page-locked host buffers and copied asynchronously.

Buffers grow to the largest field seen and are reused for every later field of that size or
smaller.  Callers that can write images straight into :meth:`CudaBackend.input_buffers` skip the
one host copy that remains.  One stream per backend; calls are serialised by a lock.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from inference.exceptions import BackendUnavailableError, SpectrumInputError
from inference.kernels import read_kernel
from inference.spectrum.params import RbhistParams, WdiffParams
from inference.spectrum.types import Histogram
from inference.spectrum.validate import U8, Mask, check_pair

log = logging.getLogger(__name__)

Params = WdiffParams | RbhistParams
MemoryMode = Literal["mapped", "staged"]

KERNEL_FILE = "omis_spectrum.cu"
# Passed to nvcc by pycuda's SourceModule (which adds -arch for the GPU it runs on) and used by
# the standalone compile check.
COMPILE_OPTIONS: tuple[str, ...] = ("-O3", "-std=c++17")
KERNEL_NAMES = {"omis-wdiff-v1": "omis_wdiff_v1", "omis-rbhist-v1": "omis_rbhist_v1"}
# Must match kBlockThreads / kGroupPixels in the kernel (a test checks both).
BLOCK_THREADS = 256
GROUP_PIXELS = 16
# Pixels one block may see, so that its 32-bit shared sums stay exact: |sum w| <= 510 per pixel.
MAX_PIXELS_PER_BLOCK = 1 << 21
INT32_SAFE_PIXELS = (2**31 - 1) // 510
# a = (num + den) * L must fit in int32 inside the kernel: 2 * 260100 * L < 2^31.
MAX_WDIFF_BINS = (2**31 - 1) // (2 * 260100)
# Shared memory the driver reserves per resident block (sm_80 and later).
SMEM_RESERVED_PER_BLOCK = 1024
_KERNEL_ARG_TYPES = "PPPqiiiiP"


def kernel_source() -> str:
    """The CUDA C source of both spectrum kernels."""
    return read_kernel(KERNEL_FILE)


def nvcc_command(source: Path, output: Path, arch: str = "compute_87") -> list[str]:
    """The ``nvcc`` command that compiles the kernel standalone to PTX (no GPU needed).

    ``compute_87`` is Jetson Orin's architecture; pass ``sm_XX`` with a ``.cubin`` output to run
    ptxas as well.
    """
    kind = "-ptx" if arch.startswith("compute_") else "-cubin"
    return ["nvcc", *COMPILE_OPTIONS, f"-arch={arch}", kind, str(source), "-o", str(output)]


@dataclass(frozen=True)
class DeviceLimits:
    """The few properties of a GPU that the launch plan depends on."""

    sm_count: int
    max_threads_per_sm: int = 2048
    max_blocks_per_sm: int = 32
    regs_per_sm: int = 65536
    smem_per_sm: int = 228 * 1024
    smem_per_block: int = 48 * 1024


@dataclass(frozen=True)
class LaunchPlan:
    """Grid, block and shared-memory layout of one kernel launch."""

    grid: int
    block: int
    copies: int
    shared_bytes: int
    blocks_per_sm: int


def resident_blocks(limits: DeviceLimits, regs_per_thread: int, shared_bytes: int) -> int:
    """Blocks of :data:`BLOCK_THREADS` that fit on one SM at once (at least 1)."""
    by_threads = limits.max_threads_per_sm // BLOCK_THREADS
    by_regs = limits.regs_per_sm // (max(regs_per_thread, 1) * BLOCK_THREADS)
    by_smem = limits.smem_per_sm // (shared_bytes + SMEM_RESERVED_PER_BLOCK)
    return max(1, min(limits.max_blocks_per_sm, by_threads, by_regs, by_smem))


def plan_launch(
    n_pixels: int, n_bins: int, limits: DeviceLimits, regs_per_thread: int = 64
) -> LaunchPlan:
    """Plan a launch: one privatised histogram per warp where shared memory allows, a grid
    that fills the GPU once, and enough blocks that no block sees more than
    :data:`MAX_PIXELS_PER_BLOCK` pixels."""
    if n_pixels <= 0:
        raise SpectrumInputError("the image is empty")
    copy_bytes = 8 * n_bins  # int32 hist + uint32 count per bin
    if copy_bytes > limits.smem_per_block:
        raise SpectrumInputError(
            f"{n_bins} bins need {copy_bytes} bytes of shared memory; "
            f"this GPU offers {limits.smem_per_block} per block"
        )
    warps = BLOCK_THREADS // 32
    resident = resident_blocks(limits, regs_per_thread, copy_bytes)
    share = min(limits.smem_per_block, limits.smem_per_sm // resident - SMEM_RESERVED_PER_BLOCK)
    copies = max(1, min(warps, share // copy_bytes))
    shared = copies * copy_bytes
    resident = resident_blocks(limits, regs_per_thread, shared)
    groups = n_pixels // GROUP_PIXELS
    work_blocks = max(1, math.ceil(groups / BLOCK_THREADS))
    grid = min(work_blocks, limits.sm_count * resident)
    grid = max(grid, math.ceil(n_pixels / MAX_PIXELS_PER_BLOCK))
    return LaunchPlan(grid, BLOCK_THREADS, copies, shared, resident)


def max_pixels_per_block(n_pixels: int, grid: int) -> int:
    """Upper bound on the pixels one block processes under the kernel's grid-stride loop."""
    groups = n_pixels // GROUP_PIXELS
    per_thread = math.ceil(groups / (grid * BLOCK_THREADS))
    return per_thread * BLOCK_THREADS * GROUP_PIXELS + (n_pixels - groups * GROUP_PIXELS)


def choose_memory_mode(integrated: bool, can_map_host_memory: bool) -> MemoryMode:
    """Zero-copy mapped host memory on integrated GPUs (Jetson), staged copies otherwise.

    On a discrete GPU the kernel would read mapped memory across PCIe, far slower than one
    DMA copy into device memory.
    """
    return "mapped" if integrated and can_map_host_memory else "staged"


@dataclass(frozen=True)
class BufferSizes:
    """Bytes of every buffer one field needs."""

    image_bytes: int  # each of W and P
    mask_bytes: int
    out_bytes: int  # hist + count, int64

    @classmethod
    def for_field(cls, n_pixels: int, n_bins: int, with_mask: bool) -> BufferSizes:
        """Sizes for a field of ``n_pixels`` pixels and ``n_bins`` bins."""
        return cls(3 * n_pixels, n_pixels if with_mask else 0, 2 * 8 * n_bins)


@dataclass(frozen=True)
class FieldInput:
    """One checked field, ready for the GPU."""

    w: U8
    p: U8
    mask: Mask | None
    n_pixels: int
    n_bins: int
    kernel: str


def prepare_field(w: object, p: object, params: Params, mask: object | None = None) -> FieldInput:
    """Validate a field and its parameters for the kernel (raises SpectrumInputError)."""
    w_img, p_img, m = check_pair(w, p, mask)
    if isinstance(params, WdiffParams) and params.bins > MAX_WDIFF_BINS:
        raise SpectrumInputError(f"bins={params.bins} exceeds the kernel's {MAX_WDIFF_BINS}")
    try:
        kernel = KERNEL_NAMES[params.algorithm]
    except KeyError:
        raise SpectrumInputError(f"no CUDA kernel for {params.algorithm!r}") from None
    n = w_img.shape[0] * w_img.shape[1]
    return FieldInput(w_img, p_img, m, n, params.n_bins, kernel)


def _is_view_of(arr: npt.NDArray[Any], buf: npt.NDArray[Any]) -> bool:
    return bool(
        arr.flags.c_contiguous and arr.ctypes.data == buf.ctypes.data and arr.nbytes <= buf.nbytes
    )


class _Buffers:
    """Page-locked host buffers (and device buffers when staged), grown on demand."""

    def __init__(self, cuda: Any, mode: MemoryMode) -> None:
        self._cuda = cuda
        self.mode = mode
        self.pixels = 0
        self.mask_pixels = 0
        self.out_values = 0
        self.host: dict[str, npt.NDArray[Any]] = {}
        self.pinned: dict[str, Any] = {}  # pycuda HostAllocation behind each host array
        self.device: dict[str, Any] = {}

    def _pinned(self, name: str, size: int, dtype: type[np.generic]) -> None:
        cuda = self._cuda
        self._free(name)
        flags = cuda.host_alloc_flags.DEVICEMAP if self.mode == "mapped" else 0
        arr = cuda.pagelocked_empty(size, dtype, mem_flags=flags)
        self.host[name] = arr
        self.pinned[name] = arr.base
        if self.mode == "staged" or name == "out":
            self.device[name] = cuda.mem_alloc(arr.nbytes)

    def _free(self, name: str) -> None:
        dev = self.device.pop(name, None)
        if dev is not None:
            dev.free()
        # Host memory is released by dropping the last reference, never freed explicitly:
        # arrays lent by input_buffers() may still be alive and must not dangle.
        self.host.pop(name, None)
        self.pinned.pop(name, None)

    def ensure(self, n_pixels: int, with_mask: bool, n_bins: int) -> None:
        """Grow the buffers to hold a field of this size (reused when they already do)."""
        if n_pixels > self.pixels:
            self._pinned("w", 3 * n_pixels, np.uint8)
            self._pinned("p", 3 * n_pixels, np.uint8)
            self.pixels = n_pixels
        if with_mask and n_pixels > self.mask_pixels:
            self._pinned("mask", n_pixels, np.uint8)
            self.mask_pixels = n_pixels
        if 2 * n_bins > self.out_values:
            self._pinned("out", 2 * n_bins, np.int64)
            self.out_values = 2 * n_bins

    def image_view(self, name: str, shape: tuple[int, ...]) -> npt.NDArray[Any]:
        """A view of the first pixels of a host buffer, shaped like the field."""
        size = int(np.prod(shape))
        return self.host[name][:size].reshape(shape)

    def device_ptr(self, name: str) -> int:
        """The pointer the kernel reads: device memory, or mapped host memory."""
        if name in self.device:
            return int(self.device[name])
        return int(self.pinned[name].get_device_pointer())

    def free_all(self) -> None:
        """Release every buffer (idempotent)."""
        for name in list(self.host):
            self._free(name)
        self.pixels = self.mask_pixels = self.out_values = 0


def _device_limits(cuda: Any, dev: Any) -> DeviceLimits:
    def attr(name: str, default: int) -> int:
        key = getattr(cuda.device_attribute, name, None)
        return default if key is None else int(dev.get_attribute(key))

    return DeviceLimits(
        sm_count=attr("MULTIPROCESSOR_COUNT", 1),
        max_threads_per_sm=attr("MAX_THREADS_PER_MULTIPROCESSOR", 1024),
        max_blocks_per_sm=attr("MAX_BLOCKS_PER_MULTIPROCESSOR", 16),
        regs_per_sm=attr("MAX_REGISTERS_PER_MULTIPROCESSOR", 65536),
        smem_per_sm=attr("MAX_SHARED_MEMORY_PER_MULTIPROCESSOR", 64 * 1024),
        smem_per_block=attr("MAX_SHARED_MEMORY_PER_BLOCK", 48 * 1024),
    )


def _import_pycuda() -> tuple[Any, Any]:
    try:
        import pycuda.driver as cuda
        from pycuda import compiler
    except ImportError as exc:
        raise BackendUnavailableError(f"CUDA spectrum backend needs pycuda: {exc}") from exc
    return cuda, compiler


def _open_device(cuda: Any, ordinal: int) -> Any:
    try:
        cuda.init()
        count = int(cuda.Device.count())
    except cuda.Error as exc:
        raise BackendUnavailableError(f"CUDA driver not usable: {exc}") from exc
    if count == 0:
        raise BackendUnavailableError("no CUDA GPU found")
    if not 0 <= ordinal < count:
        raise BackendUnavailableError(f"CUDA device {ordinal} does not exist ({count} found)")
    return cuda.Device(ordinal)


class CudaBackend:
    """Spectrum histograms on a CUDA GPU, bit-identical to the CPU backends."""

    name = "cuda"

    def __init__(self, device: int = 0) -> None:
        cuda, compiler = _import_pycuda()
        self._cuda = cuda
        dev = _open_device(cuda, device)
        try:
            self.device_name = str(dev.name())
            self._ctx: Any = dev.retain_primary_context()
        except cuda.Error as exc:
            raise BackendUnavailableError(f"CUDA device {device} not usable: {exc}") from exc
        self._ctx.push()
        try:
            self._setup(cuda, compiler, dev)
        except (cuda.Error, compiler.CompileError, OSError) as exc:
            self._ctx.pop()
            self._ctx.detach()
            self._ctx = None
            raise BackendUnavailableError(
                f"CUDA spectrum kernel unusable on {self.device_name}: {exc}"
            ) from exc
        self._ctx.pop()
        self._lock = threading.Lock()
        log.info(
            "CUDA spectrum backend on %s (%s memory, %d registers/thread)",
            self.device_name,
            self.memory_mode,
            self._regs,
        )

    def _setup(self, cuda: Any, compiler: Any, dev: Any) -> None:
        module = compiler.SourceModule(
            kernel_source(), options=list(COMPILE_OPTIONS), no_extern_c=True
        )
        self._module = module
        self._functions: dict[str, Any] = {}
        for kernel in KERNEL_NAMES.values():
            fn = module.get_function(kernel)
            fn.prepare(_KERNEL_ARG_TYPES)
            self._functions[kernel] = fn
        self._regs = max(
            int(fn.get_attribute(cuda.function_attribute.NUM_REGS))
            for fn in self._functions.values()
        )
        self.limits = _device_limits(cuda, dev)
        attrs = cuda.device_attribute
        self.memory_mode = choose_memory_mode(
            bool(dev.get_attribute(attrs.INTEGRATED)),
            bool(dev.get_attribute(attrs.CAN_MAP_HOST_MEMORY)),
        )
        self._stream = cuda.Stream()
        self._buffers = _Buffers(cuda, self.memory_mode)
        self._field: FieldInput | None = None

    @contextmanager
    def _current(self) -> Iterator[None]:
        if self._ctx is None:
            raise BackendUnavailableError("the CUDA spectrum backend is closed")
        self._ctx.push()
        try:
            yield
        finally:
            self._ctx.pop()

    def plan(self, n_pixels: int, n_bins: int) -> LaunchPlan:
        """The launch plan this GPU uses for a field of ``n_pixels`` and ``n_bins``."""
        return plan_launch(n_pixels, n_bins, self.limits, self._regs)

    def input_buffers(self, height: int, width: int) -> tuple[U8, U8]:
        """Page-locked H×W×3 arrays for W and P; fields written there are not copied again.

        They are used in place until a larger field makes the backend grow its buffers (then
        they are copied like any array); do not use them after close().
        """
        with self._lock, self._current():
            self._buffers.ensure(height * width, False, 1)
            shape = (height, width, 3)
            return self._buffers.image_view("w", shape), self._buffers.image_view("p", shape)

    def histogram(self, w: U8, p: U8, params: Params, mask: Mask | None = None) -> Histogram:
        """The exact integer histogram of one field, computed on the GPU."""
        field = prepare_field(w, p, params, mask)
        with self._lock, self._current():
            try:
                self._upload(field)
                self._launch(field, params)
                return self._download(field, params)
            except self._cuda.Error as exc:
                raise BackendUnavailableError(f"CUDA spectrum failed: {exc}") from exc

    def _upload(self, field: FieldInput) -> None:
        bufs = self._buffers
        bufs.ensure(field.n_pixels, field.mask is not None, field.n_bins)
        for name, img in (("w", field.w), ("p", field.p)):
            view = bufs.image_view(name, img.shape)
            if not _is_view_of(img, view):
                np.copyto(view, img)
        if field.mask is not None:
            np.copyto(bufs.image_view("mask", field.mask.shape), field.mask)
        self._field = field
        self._copy_to_device(field)

    def _copy_to_device(self, field: FieldInput) -> None:
        bufs = self._buffers
        if bufs.mode == "mapped":
            return  # the kernel reads the page-locked host buffers in place
        sizes = {"w": 3 * field.n_pixels, "p": 3 * field.n_pixels}
        if field.mask is not None:
            sizes["mask"] = field.n_pixels
        for name, size in sizes.items():
            self._cuda.memcpy_htod_async(bufs.device[name], bufs.host[name][:size], self._stream)

    def _launch(self, field: FieldInput, params: Params) -> None:
        bufs = self._buffers
        plan = self.plan(field.n_pixels, field.n_bins)
        out = bufs.device["out"]
        self._cuda.memset_d8_async(out, 0, 2 * 8 * field.n_bins, self._stream)
        mask_ptr = 0 if field.mask is None else bufs.device_ptr("mask")
        self._functions[field.kernel].prepared_async_call(
            (plan.grid, 1),
            (plan.block, 1, 1),
            self._stream,
            bufs.device_ptr("w"),
            bufs.device_ptr("p"),
            mask_ptr,
            field.n_pixels,
            field.n_bins,
            params.t_low,
            params.t_sat,
            plan.copies,
            int(out),
            shared_size=plan.shared_bytes,
        )

    def _download(self, field: FieldInput, params: Params) -> Histogram:
        bufs = self._buffers
        nb = field.n_bins
        host = bufs.host["out"][: 2 * nb]
        self._cuda.memcpy_dtoh_async(host, bufs.device["out"], self._stream)
        self._stream.synchronize()
        hist = host[:nb].copy()
        count = host[nb:].copy()
        return Histogram(params.algorithm, hist, count, int(count.sum()), field.n_pixels)

    def time_kernel(self, params: Params, repeats: int = 10) -> list[float]:
        """Milliseconds of each of ``repeats`` kernel runs (CUDA events) on the last field."""
        return self._time(lambda field: self._launch(field, params), repeats)

    def time_upload(self, repeats: int = 10) -> list[float]:
        """Milliseconds of each of ``repeats`` host-to-device copies of the last field from the
        page-locked buffers (about 0 when the GPU reads host memory in place)."""
        return self._time(self._copy_to_device, repeats)

    def _time(self, step: Callable[[FieldInput], None], repeats: int) -> list[float]:
        cuda = self._cuda
        with self._lock, self._current():
            field = self._field
            if field is None:
                raise SpectrumInputError("no field has been computed yet")
            times = []
            for _ in range(repeats):
                start, stop = cuda.Event(), cuda.Event()
                start.record(self._stream)
                step(field)
                stop.record(self._stream)
                stop.synchronize()
                times.append(float(stop.time_since(start)))
            return times

    def close(self) -> None:
        """Free the GPU buffers and release the context; idempotent."""
        if self._ctx is None:
            return
        with self._lock, self._current():
            self._buffers.free_all()
            self._stream = None
        self._ctx.detach()
        self._ctx = None

    def __enter__(self) -> CudaBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
