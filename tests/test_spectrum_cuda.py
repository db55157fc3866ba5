"""The CUDA spectrum backend: host-side logic and kernel checks that run anywhere, and the
GPU-only checks (marked ``gpu``).  Bit-identity on many images is in test_spectrum_backends.py.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from inference.exceptions import BackendUnavailableError, SpectrumInputError
from inference.spectrum import compute_spectrum, open_backend, parse_params
from inference.spectrum.cpu import numpy_histogram
from inference.spectrum.cuda import (
    BLOCK_THREADS,
    COMPILE_OPTIONS,
    GROUP_PIXELS,
    INT32_SAFE_PIXELS,
    KERNEL_NAMES,
    MAX_PIXELS_PER_BLOCK,
    SMEM_RESERVED_PER_BLOCK,
    BufferSizes,
    CudaBackend,
    DeviceLimits,
    choose_memory_mode,
    kernel_source,
    max_pixels_per_block,
    nvcc_command,
    plan_launch,
    prepare_field,
)
from inference.spectrum.params import WdiffParams
from inference.spectrum.reference import reference_histogram

H200 = DeviceLimits(sm_count=132, smem_per_sm=228 * 1024)
ORIN_NANO = DeviceLimits(sm_count=8, max_threads_per_sm=1536, max_blocks_per_sm=16,
                         smem_per_sm=164 * 1024)  # fmt: skip
OLD_SMALL = DeviceLimits(sm_count=2, max_threads_per_sm=1024, max_blocks_per_sm=16,
                         regs_per_sm=32768, smem_per_sm=48 * 1024)  # fmt: skip
LIMITS = [H200, ORIN_NANO, OLD_SMALL]

# --- kernel source and standalone compilation (no GPU needed) ---------------------------------


def test_kernel_source_matches_host_constants() -> None:
    src = kernel_source()
    assert re.search(rf"kBlockThreads = {BLOCK_THREADS};", src)
    assert re.search(rf"kGroupPixels = {GROUP_PIXELS};", src)
    for kernel in KERNEL_NAMES.values():
        match = re.search(rf'extern "C" __global__ .*?{kernel}\((.*?)\)', src, re.S)
        assert match, kernel
        assert len(match.group(1).split(",")) == 9  # the 9 arguments _launch passes
    assert "float atomics" not in src.replace("never float atomics", "")


@pytest.fixture(scope="module")
def nvcc() -> str:
    path = shutil.which("nvcc")
    if path is None:
        pytest.skip("nvcc is not on PATH")
    return path


@pytest.fixture(scope="module")
def kernel_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("kernel") / "omis_spectrum.cu"
    path.write_text(kernel_source(), encoding="utf-8")
    return path


def test_kernel_compiles_to_ptx_with_integer_atomics_only(nvcc: str, kernel_file: Path) -> None:
    ptx = kernel_file.with_suffix(".ptx")
    cmd = nvcc_command(kernel_file, ptx)  # Jetson Orin: compute_87
    assert cmd[0] == "nvcc" and all(opt in cmd for opt in COMPILE_OPTIONS)
    done = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    text = ptx.read_text()
    for kernel in KERNEL_NAMES.values():
        assert f".entry {kernel}(" in text
    assert "atom.shared.add.u32" in text  # privatised 32-bit shared histograms
    assert "atom.global.add.u64" in text  # 64-bit integer accumulation
    assert not re.search(r"(atom|red)\.[a-z.]*\.f(16|32|64)", text)  # never float atomics


def test_kernel_keeps_its_arrays_in_registers(nvcc: str, kernel_file: Path) -> None:
    """ptxas for a Hopper target: no local-memory stack frame or spills (the 16-pixel loop
    must be fully unrolled for the vectorised loads to pay off)."""
    cubin = kernel_file.with_suffix(".cubin")
    cmd = [*nvcc_command(kernel_file, cubin, arch="sm_90"), "-Xptxas", "-v"]
    done = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    report = done.stderr
    assert report.count("0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads") == 2
    regs = [int(r) for r in re.findall(r"Used (\d+) registers", report)]
    assert len(regs) == 2 and max(regs) <= 128


# --- launch plan and buffers (pure functions) ----------------------------------------------


@pytest.mark.parametrize("limits", LIMITS, ids=["h200", "orin-nano", "small"])
@pytest.mark.parametrize("n_bins", [2, 290, 511, 4000])
def test_launch_plan_fits_the_device(limits: DeviceLimits, n_bins: int) -> None:
    regs = 63
    plan = plan_launch(20_000_000, n_bins, limits, regs)
    assert plan.block == BLOCK_THREADS
    assert 1 <= plan.copies <= BLOCK_THREADS // 32
    assert plan.shared_bytes == plan.copies * 8 * n_bins <= limits.smem_per_block
    bps = plan.blocks_per_sm
    assert bps * (plan.shared_bytes + SMEM_RESERVED_PER_BLOCK) <= limits.smem_per_sm
    assert bps * BLOCK_THREADS <= limits.max_threads_per_sm
    assert bps * BLOCK_THREADS * regs <= limits.regs_per_sm
    assert plan.grid <= max(limits.sm_count * bps, -(-20_000_000 // MAX_PIXELS_PER_BLOCK))


def test_launch_plan_examples() -> None:
    plan = plan_launch(20_000_000, 290, H200, regs_per_thread=63)
    assert (plan.blocks_per_sm, plan.grid, plan.copies) == (4, 528, 8)
    assert plan_launch(4000 * 8, 290, H200, 63).copies == 8
    assert plan_launch(4000 * 8, 4000, H200, 63).copies == 1  # 32 kB per copy
    tiny = plan_launch(1, 290, H200, 63)
    assert tiny.grid == 1  # the tail pixel is handled by thread 0
    small = plan_launch(17 * 16, 290, H200, 63)
    assert small.grid == 1
    # a huge field on a small GPU: more blocks than resident, to keep 32-bit sums exact
    big = plan_launch(100_000_000, 290, ORIN_NANO, 63)
    assert big.grid >= 100_000_000 / MAX_PIXELS_PER_BLOCK


@settings(max_examples=200, deadline=None)
@given(
    st.integers(1, 2**31),
    st.sampled_from(LIMITS),
    st.sampled_from([2, 290, 511, 4000]),
    st.integers(16, 255),
)
def test_no_block_sees_too_many_pixels(
    n: int, limits: DeviceLimits, n_bins: int, regs: int
) -> None:
    plan = plan_launch(n, n_bins, limits, regs)
    assert plan.grid >= 1
    assert max_pixels_per_block(n, plan.grid) <= INT32_SAFE_PIXELS
    assert plan.grid * BLOCK_THREADS >= n % GROUP_PIXELS  # tail pixels have threads


def test_max_pixels_per_block() -> None:
    assert max_pixels_per_block(1, 1) == 1
    assert max_pixels_per_block(16, 1) == 16 * BLOCK_THREADS  # bound: one group per thread
    assert max_pixels_per_block(16 * BLOCK_THREADS * 3 + 5, 1) == 16 * BLOCK_THREADS * 3 + 5
    assert max_pixels_per_block(16 * BLOCK_THREADS * 3, 2) == 16 * BLOCK_THREADS * 2


def test_launch_plan_rejects_impossible_requests() -> None:
    with pytest.raises(SpectrumInputError, match="shared memory"):
        plan_launch(100, 7000, H200)
    with pytest.raises(SpectrumInputError, match="empty"):
        plan_launch(0, 290, H200)


def test_memory_mode_follows_the_gpu_kind() -> None:
    assert choose_memory_mode(integrated=True, can_map_host_memory=True) == "mapped"
    assert choose_memory_mode(integrated=True, can_map_host_memory=False) == "staged"
    assert choose_memory_mode(integrated=False, can_map_host_memory=True) == "staged"
    assert choose_memory_mode(integrated=False, can_map_host_memory=False) == "staged"


def test_buffer_sizes() -> None:
    sizes = BufferSizes.for_field(2448 * 2048, 290, with_mask=True)
    assert sizes.image_bytes == 3 * 2448 * 2048
    assert sizes.mask_bytes == 2448 * 2048
    assert sizes.out_bytes == 2 * 8 * 290
    assert BufferSizes.for_field(10, 511, with_mask=False).mask_bytes == 0


def test_prepare_field_checks_and_selects_the_kernel() -> None:
    w = np.zeros((3, 4, 3), np.uint8)
    field = prepare_field(w, w, parse_params({"algorithm": "omis-rbhist-v1"}))
    assert (field.n_pixels, field.n_bins, field.kernel) == (12, 511, "omis_rbhist_v1")
    assert prepare_field(w, w, parse_params()).kernel == "omis_wdiff_v1"
    too_many = WdiffParams.model_construct(bins=5000)  # bypasses validation on purpose
    with pytest.raises(SpectrumInputError, match="bins=5000"):
        prepare_field(w, w, too_many)


# --- construction errors: never a silent fallback -------------------------------------------


def test_open_cuda_here_works_or_says_why() -> None:
    try:
        backend = open_backend("cuda")
    except BackendUnavailableError as exc:
        assert re.search(r"pycuda|GPU|driver|kernel", str(exc)), str(exc)
    else:
        assert backend.name == "cuda"
        backend.close()


def _hide_pycuda(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("pycuda", "pycuda.driver", "pycuda.compiler"):
        monkeypatch.setitem(sys.modules, name, None)


def test_missing_pycuda_is_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    _hide_pycuda(monkeypatch)
    with pytest.raises(BackendUnavailableError, match="needs pycuda"):
        open_backend("cuda")
    with pytest.raises(BackendUnavailableError, match="needs pycuda"):
        compute_spectrum([(np.ones((2, 2, 3), np.uint8),) * 2], parse_params(), backend="cuda")


def test_auto_uses_numpy_when_cuda_is_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    _hide_pycuda(monkeypatch)
    backend = open_backend("auto")
    assert backend.name == "numpy"
    w = np.full((3, 3, 3), 90, np.uint8)
    assert compute_spectrum([(w, w)], parse_params(), backend="auto").backend == "numpy"


class _FakeError(Exception):
    """Stands in for pycuda.driver.Error."""


class _FakeCompileError(Exception):
    """Stands in for pycuda.driver.CompileError."""


class _FakeContext:
    def __init__(self, log: list[str]) -> None:
        self.log = log

    def push(self) -> None:
        self.log.append("push")

    def pop(self) -> None:
        self.log.append("pop")

    def detach(self) -> None:
        self.log.append("detach")


def _fake_pycuda(
    monkeypatch: pytest.MonkeyPatch, count: int, init_error: str = "", compile_error: str = ""
) -> list[str]:
    """Installs an in-memory pycuda whose driver/compiler fail as asked; returns its call log."""
    log: list[str] = []

    class Device:
        def __init__(self, ordinal: int) -> None:
            self.ordinal = ordinal

        @staticmethod
        def count() -> int:
            return count

        def name(self) -> str:
            return "Fake GPU"

        def retain_primary_context(self) -> _FakeContext:
            log.append("retain")
            return _FakeContext(log)

    def init() -> None:
        if init_error:
            raise _FakeError(init_error)

    def source_module(*args: Any, **kwargs: Any) -> None:
        log.append("compile " + " ".join(kwargs.get("options", [])))
        raise _FakeCompileError(compile_error)

    driver = types.ModuleType("pycuda.driver")
    driver.__dict__.update(Error=_FakeError, CompileError=_FakeCompileError, Device=Device,
                           init=init)  # fmt: skip
    compiler = types.ModuleType("pycuda.compiler")
    compiler.__dict__.update(SourceModule=source_module, CompileError=_FakeCompileError)
    package = types.ModuleType("pycuda")
    package.__dict__.update(driver=driver, compiler=compiler)
    monkeypatch.setitem(sys.modules, "pycuda", package)
    monkeypatch.setitem(sys.modules, "pycuda.driver", driver)
    monkeypatch.setitem(sys.modules, "pycuda.compiler", compiler)
    return log


def test_no_gpu_is_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_pycuda(monkeypatch, count=0)
    with pytest.raises(BackendUnavailableError, match="no CUDA GPU found"):
        CudaBackend()
    _fake_pycuda(monkeypatch, count=1)
    with pytest.raises(BackendUnavailableError, match="device 3 does not exist"):
        CudaBackend(device=3)


def test_driver_failure_is_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_pycuda(monkeypatch, count=1, init_error="CUDA_ERROR_NO_DEVICE")
    with pytest.raises(BackendUnavailableError, match="driver not usable: CUDA_ERROR_NO_DEVICE"):
        open_backend("cuda")


def test_compile_failure_is_unavailable_and_releases_the_context(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    log = _fake_pycuda(monkeypatch, count=1, compile_error="nvcc: error: bad arch")
    with pytest.raises(BackendUnavailableError, match="kernel unusable on Fake GPU: nvcc: error"):
        CudaBackend()
    assert log == ["retain", "push", "compile " + " ".join(COMPILE_OPTIONS), "pop", "detach"]


# --- on a GPU -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cuda_backend() -> Iterator[CudaBackend]:
    backend = CudaBackend()
    yield backend
    backend.close()


@pytest.mark.gpu
def test_auto_chooses_cuda() -> None:
    backend = open_backend("auto")
    try:
        assert backend.name == "cuda"
    finally:
        backend.close()


@pytest.mark.gpu
def test_camera_sized_field_is_bit_identical(cuda_backend: CudaBackend) -> None:
    rng = np.random.default_rng(8)
    w = rng.integers(0, 256, (2048, 2448, 3), dtype=np.uint8)
    p = np.clip(w.astype(np.int16) - rng.integers(0, 60, w.shape), 0, 255).astype(np.uint8)
    for params in (parse_params(), parse_params({"algorithm": "omis-rbhist-v1"})):
        assert cuda_backend.histogram(w, p, params).equals(numpy_histogram(w, p, params))


@pytest.mark.gpu
def test_pinned_input_buffers_are_used_in_place(cuda_backend: CudaBackend) -> None:
    rng = np.random.default_rng(4)
    w_buf, p_buf = cuda_backend.input_buffers(33, 47)
    w_buf[...] = rng.integers(0, 256, w_buf.shape, dtype=np.uint8)
    p_buf[...] = rng.integers(0, 256, p_buf.shape, dtype=np.uint8)
    params = parse_params()
    want = reference_histogram(w_buf.copy(), p_buf.copy(), params)
    assert cuda_backend.histogram(w_buf, p_buf, params).equals(want)
    # an ordinary array of a smaller field afterwards still gives the right answer
    w, p = w_buf[:5, :6].copy(), p_buf[:5, :6].copy()
    assert cuda_backend.histogram(w, p, params).equals(reference_histogram(w, p, params))


@pytest.mark.gpu
def test_spectrum_on_cuda_equals_numpy(cuda_backend: CudaBackend) -> None:
    rng = np.random.default_rng(12)
    images = [rng.integers(0, 256, (40, 50, 3), dtype=np.uint8) for _ in range(6)]
    fields = list(zip(images[::2], images[1::2], strict=True))
    params = parse_params()
    on_gpu = compute_spectrum(fields, params, backend=cuda_backend)
    on_cpu = compute_spectrum(fields, params, backend="numpy")
    assert on_gpu.backend == "cuda"
    np.testing.assert_array_equal(on_gpu.smoothed, on_cpu.smoothed)
    np.testing.assert_array_equal(on_gpu.y, on_cpu.y)


@pytest.mark.gpu
def test_timings_and_close(cuda_backend: CudaBackend) -> None:
    w = np.full((64, 64, 3), 120, np.uint8)
    params = parse_params()
    cuda_backend.histogram(w, w, params)
    assert all(t > 0 for t in cuda_backend.time_kernel(params, repeats=3))
    assert all(t >= 0 for t in cuda_backend.time_upload(repeats=2))
    plan = cuda_backend.plan(20_000_000, 290)
    assert plan.shared_bytes <= cuda_backend.limits.smem_per_block
    extra = CudaBackend()
    extra.close()
    extra.close()  # idempotent
    with pytest.raises(BackendUnavailableError, match="closed"):
        extra.histogram(w, w, params)
