"""The CUDA kernel's own source, run on the CPU: no GPU needed.

A small C++ prelude maps the few CUDA built-ins the kernel uses onto host equivalents (one
std::thread per CUDA thread, std::barrier for __syncthreads, compiler atomics, a static array
for shared memory filled with garbage before every block), and g++ compiles it together with
``omis_spectrum.cu`` unchanged.  This checks the kernel's logic - byte extraction from the
vectorised loads, tail pixels, masks, grid-stride loop, per-warp histogram copies, the flush, and
the exact bin index - against the reference.  ``__fdividef`` can be made deliberately
inaccurate (far beyond the GPU's 2 ulp) to prove that the integer fix-up makes the bin index
exact whatever the float estimate.  Timing and memory behaviour need a real GPU.
"""

from __future__ import annotations

import ctypes
import shutil
import subprocess

import numpy as np
import numpy.typing as npt
import pytest

from inference.spectrum import parse_params
from inference.spectrum.cuda import DeviceLimits, kernel_source, plan_launch
from inference.spectrum.params import RbhistParams, WdiffParams
from inference.spectrum.reference import reference_histogram
from inference.spectrum.types import Histogram

U8 = npt.NDArray[np.uint8]
Params = WdiffParams | RbhistParams

SHARED_INTS = 16384  # 64 kB of emulated shared memory

PRELUDE = r"""
#include <barrier>
#include <cstring>
#include <thread>
#include <vector>

struct uint4 { unsigned x, y, z, w; };
struct dim3 { unsigned x = 0, y = 0, z = 0; };
static inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) {
    return uint4{x, y, z, w};
}
static thread_local dim3 threadIdx;
static dim3 blockIdx, blockDim, gridDim;
static std::barrier<>* g_barrier = nullptr;
static int g_div_mode = 0;

#define __global__
#define __device__
#define __forceinline__ inline
#define __shared__
#define __launch_bounds__(...)

static inline void __syncthreads() { g_barrier->arrive_and_wait(); }
static inline int max(int a, int b) { return a > b ? a : b; }
static inline int min(int a, int b) { return a < b ? a : b; }
static inline float __int2float_rn(int v) { return static_cast<float>(v); }
static inline int __float2int_rz(float v) { return static_cast<int>(v); }
static inline uint4 __ldg(const uint4* p) { return *p; }
// Modes 1-3 are far less accurate than the GPU's __fdividef (2 ulp), on purpose.
static inline float __fdividef(float a, float b) {
    float q = a / b;
    if (g_div_mode == 1) return q * 1.00002f;
    if (g_div_mode == 2) return q * 0.99998f;
    if (g_div_mode == 3) return (static_cast<int>(a) ^ static_cast<int>(b)) & 1 ? q * 1.00002f
                                                                                : q * 0.99998f;
    return q;
}
static inline int atomicAdd(int* p, int v) { return __atomic_fetch_add(p, v, __ATOMIC_RELAXED); }
static inline unsigned atomicAdd(unsigned* p, unsigned v) {
    return __atomic_fetch_add(p, v, __ATOMIC_RELAXED);
}
static inline unsigned long long atomicAdd(unsigned long long* p, unsigned long long v) {
    return __atomic_fetch_add(p, v, __ATOMIC_RELAXED);
}
namespace omis { int smem[@SHARED@]; }
""".replace("@SHARED@", str(SHARED_INTS))

RUNNER = r"""
extern "C" int run_kernel(int rbhist, const unsigned char* w, const unsigned char* p,
                          const unsigned char* mask, long long n, int n_bins, int t_low,
                          int t_sat, int copies, int grid, int block, int div_mode,
                          unsigned long long* out) {
    if (2 * n_bins * copies > @SHARED@) return -1;
    g_div_mode = div_mode;
    blockDim.x = block;
    gridDim.x = grid;
    for (int b = 0; b < grid; ++b) {
        blockIdx.x = b;
        std::memset(omis::smem, 0x5A, sizeof(omis::smem));  // shared memory starts as garbage
        std::barrier<> bar(block);
        g_barrier = &bar;
        std::vector<std::thread> threads;
        for (int t = 0; t < block; ++t) {
            threads.emplace_back([=] {
                threadIdx.x = t;
                if (rbhist) omis_rbhist_v1(w, p, mask, n, n_bins, t_low, t_sat, copies, out);
                else omis_wdiff_v1(w, p, mask, n, n_bins, t_low, t_sat, copies, out);
            });
        }
        for (auto& th : threads) th.join();
    }
    return 0;
}
""".replace("@SHARED@", str(SHARED_INTS))


@pytest.fixture(scope="module")
def kernel_lib(tmp_path_factory: pytest.TempPathFactory) -> ctypes.CDLL:
    gxx = shutil.which("g++")
    if gxx is None:
        pytest.skip("g++ is not on PATH")
    tmp = tmp_path_factory.mktemp("emulation")
    (tmp / "omis_spectrum.cu").write_text(kernel_source(), encoding="utf-8")
    src = tmp / "emulate.cpp"
    src.write_text(PRELUDE + '#include "omis_spectrum.cu"\n' + RUNNER, encoding="utf-8")
    lib = tmp / "libemulate.so"
    flags = ["-std=c++20", "-O1", "-shared", "-fPIC", "-pthread", "-fno-strict-aliasing"]
    warnings = ["-Wall", "-Werror", "-Wno-unused-function", "-Wno-unknown-pragmas"]
    cmd = [gxx, *flags, *warnings, str(src), "-o", str(lib)]
    done = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr
    return ctypes.CDLL(str(lib))


def emulate(
    lib: ctypes.CDLL,
    w: U8,
    p: U8,
    params: Params,
    mask: npt.NDArray[np.bool_] | None = None,
    *,
    grid: int,
    block: int = 256,
    copies: int | None = None,
    div_mode: int = 0,
) -> Histogram:
    """Run the kernel as the host code launches it: zeroed output, sum(count) as N."""
    n = w.shape[0] * w.shape[1]
    nb = params.n_bins
    if copies is None:  # one per warp, within a GPU's default 48 kB of shared memory per block
        copies = max(1, min(block // 32, 48 * 1024 // (8 * nb)))
    w_c, p_c = np.ascontiguousarray(w), np.ascontiguousarray(p)
    m_c = None if mask is None else np.ascontiguousarray(mask).view(np.uint8)
    out = np.zeros(2 * nb, np.int64)
    ptr = ctypes.c_void_p
    rc = lib.run_kernel(
        ctypes.c_int(isinstance(params, RbhistParams)),
        ptr(w_c.ctypes.data),
        ptr(p_c.ctypes.data),
        ptr(None if m_c is None else m_c.ctypes.data),
        ctypes.c_longlong(n),
        ctypes.c_int(nb),
        ctypes.c_int(params.t_low),
        ctypes.c_int(params.t_sat),
        ctypes.c_int(copies),
        ctypes.c_int(grid),
        ctypes.c_int(block),
        ctypes.c_int(div_mode),
        ptr(out.ctypes.data),
    )
    assert rc == 0
    count = out[nb:].copy()
    return Histogram(params.algorithm, out[:nb].copy(), count, int(count.sum()), n)


def pair(seed: int, h: int, w: int, low: int = 0, high: int = 256) -> tuple[U8, U8]:
    rng = np.random.default_rng(seed)
    return (
        rng.integers(low, high, (h, w, 3), dtype=np.uint8),
        rng.integers(low, high, (h, w, 3), dtype=np.uint8),
    )


WDIFF = parse_params()
RBHIST = parse_params({"algorithm": "omis-rbhist-v1"})
ALGOS = [pytest.param(WDIFF, id="wdiff"), pytest.param(RBHIST, id="rbhist")]


@pytest.mark.parametrize("params", ALGOS)
@pytest.mark.parametrize(
    ("shape", "grid", "block", "copies"),
    [
        ((1, 1), 1, 256, None),  # only a tail pixel
        ((1, 15), 1, 64, 1),  # tail only, one copy
        ((4, 4), 1, 64, 2),  # exactly one group
        ((17, 19), 1, 64, 2),  # groups and a tail of 3
        ((31, 257), 2, 256, None),  # several groups per thread, two blocks
        ((50, 61), 3, 64, 3),  # grid-stride over three blocks, copies not dividing warps
    ],
)
def test_kernel_logic_matches_reference(
    kernel_lib: ctypes.CDLL,
    params: Params,
    shape: tuple[int, int],
    grid: int,
    block: int,
    copies: int | None,
) -> None:
    w, p = pair(shape[0] * 31 + shape[1], *shape)
    want = reference_histogram(w, p, params)
    got = emulate(kernel_lib, w, p, params, grid=grid, block=block, copies=copies)
    assert got.equals(want)
    mask = np.random.default_rng(1).random(shape) < 0.5
    mask.flat[-1] = True
    want_m = reference_histogram(w, p, params, mask)
    got_m = emulate(kernel_lib, w, p, params, mask, grid=grid, block=block, copies=copies)
    assert got_m.equals(want_m)


@pytest.mark.parametrize("div_mode", [0, 1, 2, 3])
@pytest.mark.parametrize("bins", [2, 290, 4000])
def test_bin_index_is_exact_whatever_the_float_estimate(
    kernel_lib: ctypes.CDLL, div_mode: int, bins: int
) -> None:
    """Random pixels plus pixels exactly on bin edges, with a float division off by up to
    2e-5 relative (0.08 bins at L = 4000): the remainder fix-up must restore the exact floor."""
    w, p = pair(bins + div_mode, 64, 64, low=0, high=250)
    same = w[:8].copy()  # W == P: exactly on the edge L/2
    top_w = np.zeros((1, 64, 3), np.uint8)
    top_p = np.zeros((1, 64, 3), np.uint8)
    top_w[..., 0], top_p[..., 2] = 120, 40  # B_W = R_P = 0: exactly j = L, clipped to L - 1
    w_all = np.concatenate([w, same, top_w])
    p_all = np.concatenate([p, same, top_p])
    params = parse_params({"bins": bins, "t_low": 1})
    want = reference_histogram(w_all, p_all, params)
    got = emulate(kernel_lib, w_all, p_all, params, grid=2, block=128, div_mode=div_mode)
    assert got.equals(want)


def test_thresholds_at_their_limits(kernel_lib: ctypes.CDLL) -> None:
    w, p = pair(5, 20, 24)
    w[:4] = 0
    for extra in ({"t_low": 1}, {"t_sat": 256}, {"t_low": 1, "t_sat": 256}):
        for algorithm in ("omis-wdiff-v1", "omis-rbhist-v1"):
            params = parse_params({"algorithm": algorithm, **extra})
            with np.errstate(divide="ignore", invalid="ignore"):
                want = reference_histogram(w, p, params)
            assert emulate(kernel_lib, w, p, params, grid=1, block=64).equals(want)


def test_with_the_host_launch_plan(kernel_lib: ctypes.CDLL) -> None:
    """The grid and copies the host would choose on a small GPU (8 SMs, like Orin Nano)."""
    limits = DeviceLimits(sm_count=8, max_threads_per_sm=1536, smem_per_sm=164 * 1024)
    w, p = pair(77, 70, 90, low=10, high=240)
    for params in (WDIFF, RBHIST):
        plan = plan_launch(w.shape[0] * w.shape[1], params.n_bins, limits, regs_per_thread=63)
        got = emulate(kernel_lib, w, p, params, grid=plan.grid, copies=plan.copies)
        assert got.equals(reference_histogram(w, p, params))
