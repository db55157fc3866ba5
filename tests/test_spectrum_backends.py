"""Every spectrum backend against the plain reference transcription, bit for bit.

The same tests run on the vectorised CPU backend everywhere and on the CUDA backend where a GPU
is usable (the ``cuda`` parameter carries the ``gpu`` marker).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import numpy.typing as npt
import pytest

from inference.spectrum import SpectrumBackend, open_backend, parse_params, slide_histogram
from inference.spectrum.params import RbhistParams, WdiffParams
from inference.spectrum.reference import reference_histogram
from inference.spectrum.types import Histogram

U8 = npt.NDArray[np.uint8]
Params = WdiffParams | RbhistParams

WDIFF = parse_params({"algorithm": "omis-wdiff-v1"})
RBHIST = parse_params({"algorithm": "omis-rbhist-v1"})
ALGOS = [pytest.param(WDIFF, id="wdiff"), pytest.param(RBHIST, id="rbhist")]
# 1x1, single rows/columns, sizes that are not multiples of the kernel's 16-pixel groups or
# 256-thread blocks, and one a bit over one chunk of the CPU backend (32768 pixels).
SHAPES = [(1, 1), (1, 17), (13, 1), (3, 5), (17, 19), (64, 33), (31, 257), (129, 263)]


@pytest.fixture(scope="module", params=["numpy", pytest.param("cuda", marks=pytest.mark.gpu)])
def backend(request: pytest.FixtureRequest) -> Iterator[SpectrumBackend]:
    opened = open_backend(request.param)
    assert opened.name == request.param
    yield opened
    opened.close()


def random_pair(rng: np.random.Generator, h: int, w: int) -> tuple[U8, U8]:
    """Uniform noise: every code path (valid, dark, saturated) in every bin."""
    return (
        rng.integers(0, 256, (h, w, 3), dtype=np.uint8),
        rng.integers(0, 256, (h, w, 3), dtype=np.uint8),
    )


def simulated_pair(rng: np.random.Generator, h: int, w: int) -> tuple[U8, U8]:
    """A field like the microscope's: bright, partly saturated glass, stained cells, noise;
    the polarized image darker and shifted in colour, mostly inside a few central bins."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    base = np.empty((h, w, 3))
    base[...] = (232.0, 220.0, 247.0)  # the blue channel of the glass often saturates
    for _ in range(max(1, h * w // 400)):
        cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        r = rng.uniform(2, 9)
        blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))[..., None]
        base -= blob * rng.uniform((60, 110, 20), (140, 190, 90))
    diffuse = base + rng.normal(0, 3, base.shape)
    polarized = base * rng.uniform(0.55, 0.7) + (8.0, 0.0, -6.0) + rng.normal(0, 3, base.shape)
    return (
        np.clip(np.rint(diffuse), 0, 255).astype(np.uint8),
        np.clip(np.rint(polarized), 0, 255).astype(np.uint8),
    )


def random_mask(rng: np.random.Generator, h: int, w: int) -> npt.NDArray[np.bool_]:
    mask = rng.random((h, w)) < 0.6
    mask.flat[0] = True  # never empty
    return mask


def assert_same(got: Histogram, want: Histogram) -> None:
    assert got.hist.dtype == np.int64 and got.count.dtype == np.int64
    assert got.equals(want), (
        f"hist diff at {np.flatnonzero(got.hist != want.hist)[:10]}, "
        f"count diff at {np.flatnonzero(got.count != want.count)[:10]}, "
        f"N {got.valid_pixels} vs {want.valid_pixels}"
    )


@pytest.mark.parametrize("params", ALGOS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_random_images_match_reference(
    backend: SpectrumBackend, params: Params, shape: tuple[int, int]
) -> None:
    rng = np.random.default_rng(shape[0] * 1000 + shape[1])
    w, p = random_pair(rng, *shape)
    assert_same(backend.histogram(w, p, params), reference_histogram(w, p, params))


@pytest.mark.parametrize("params", ALGOS)
@pytest.mark.parametrize("shape", [(1, 1), (17, 19), (31, 257)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_masked_images_match_reference(
    backend: SpectrumBackend, params: Params, shape: tuple[int, int]
) -> None:
    rng = np.random.default_rng(7 + shape[0])
    w, p = random_pair(rng, *shape)
    mask = random_mask(rng, *shape)
    assert_same(backend.histogram(w, p, params, mask), reference_histogram(w, p, params, mask))


@pytest.mark.parametrize("params", ALGOS)
@pytest.mark.parametrize("shape", [(48, 64), (97, 131)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_simulated_images_match_reference(
    backend: SpectrumBackend, params: Params, shape: tuple[int, int]
) -> None:
    rng = np.random.default_rng(shape[1])
    w, p = simulated_pair(rng, *shape)
    ref = reference_histogram(w, p, params)
    assert 0 < ref.valid_pixels < ref.total_pixels  # the field is partly usable, partly not
    assert_same(backend.histogram(w, p, params), ref)
    mask = random_mask(rng, *shape)
    assert_same(backend.histogram(w, p, params, mask), reference_histogram(w, p, params, mask))


def edge_pixels(n_bins: int, count: int, seed: int) -> tuple[U8, U8]:
    """Pixels whose (num + den) L / (2 den) is an exact integer: exactly on a bin edge."""
    rng = np.random.default_rng(seed)
    w, p = random_pair(rng, 1, 200_000)
    r_w, b_w = w[0, :, 0].astype(np.int64), w[0, :, 2].astype(np.int64)
    r_p, b_p = p[0, :, 0].astype(np.int64), p[0, :, 2].astype(np.int64)
    den = (r_w + b_w) * (r_p + b_p)
    num = r_w * b_p - r_p * b_w
    ok = (den > 0) & ((num + den) * n_bins % np.maximum(2 * den, 1) == 0)
    ok &= np.maximum(w[0].max(axis=1), p[0].max(axis=1)) < 250
    ok &= (r_w + b_w >= 8) & (r_p + b_p >= 8)
    idx = np.flatnonzero(ok)[:count]
    assert idx.size >= 20  # edge pixels are rare for odd L but always present
    return w[:, idx], p[:, idx]


@pytest.mark.parametrize("bins", [2, 290, 291, 4000])
def test_pixels_exactly_on_bin_edges(backend: SpectrumBackend, bins: int) -> None:
    params = parse_params({"bins": bins})
    w, p = edge_pixels(bins, 500, seed=bins)
    # also the pixels with W == P (j = L/2 exactly) and the top edge j = L (B_W = R_P = 0)
    same = w.copy()
    top_w = np.array([[[200, 10, 0], [37, 0, 0]]], np.uint8)
    top_p = np.array([[[0, 10, 90], [0, 0, 8]]], np.uint8)
    w_all = np.concatenate([w, same, top_w], axis=1)
    p_all = np.concatenate([p, same, top_p], axis=1)
    ref = reference_histogram(w_all, p_all, params)
    assert ref.count[-1] >= 2  # the clipped top edge is exercised
    assert_same(backend.histogram(w_all, p_all, params), ref)


@pytest.mark.parametrize("params", ALGOS)
def test_dark_and_saturated_extremes(backend: SpectrumBackend, params: Params) -> None:
    rng = np.random.default_rng(3)
    dark = rng.integers(0, 12, (40, 41, 3), dtype=np.uint8)
    bright = rng.integers(240, 256, (40, 41, 3), dtype=np.uint8)
    for w, p in ((dark, dark[::-1]), (bright, bright[:, ::-1]), (dark, bright), (bright, dark)):
        w_c, p_c = np.ascontiguousarray(w), np.ascontiguousarray(p)
        assert_same(backend.histogram(w_c, p_c, params), reference_histogram(w_c, p_c, params))
    black = np.zeros((5, 7, 3), np.uint8)
    white = np.full((5, 7, 3), 255, np.uint8)
    for w, p in ((black, black), (white, white), (black, white)):
        got = backend.histogram(w, p, params)
        assert got.valid_pixels == 0 and not got.hist.any() and not got.count.any()
        assert got.total_pixels == 35


@pytest.mark.parametrize("algorithm", ["omis-wdiff-v1", "omis-rbhist-v1"])
def test_thresholds_at_their_limits(backend: SpectrumBackend, algorithm: str) -> None:
    """t_low = 1 admits the darkest definable pixels; t_sat = 256 admits every channel value."""
    rng = np.random.default_rng(11)
    w, p = random_pair(rng, 23, 29)
    w[:3] = 0  # R + B == 0 in W
    p[:, :2] = 0
    for extra in ({"t_low": 1}, {"t_sat": 256}, {"t_low": 1, "t_sat": 256}, {"t_low": 510}):
        params = parse_params({"algorithm": algorithm, **extra})
        with np.errstate(divide="ignore", invalid="ignore"):
            ref = reference_histogram(w, p, params)
        assert_same(backend.histogram(w, p, params), ref)


def test_every_division_case_on_a_large_field(backend: SpectrumBackend) -> None:
    """A million random colour pairs at the most demanding bin count (largest quotients)."""
    rng = np.random.default_rng(2024)
    w, p = random_pair(rng, 1000, 1000)
    for bins in (290, 4000):
        params = parse_params({"bins": bins, "t_low": 1, "t_sat": 256})
        assert_same(backend.histogram(w, p, params), reference_histogram(w, p, params))


def test_rbhist_over_several_large_chunks(backend: SpectrumBackend) -> None:
    """Over a million pixels (more than one chunk of the CPU backend), every threshold path."""
    rng = np.random.default_rng(77)
    w, p = random_pair(rng, 1031, 1023)
    for extra in ({}, {"t_low": 300, "t_sat": 200}):
        params = parse_params({"algorithm": "omis-rbhist-v1", **extra})
        mask = random_mask(rng, *w.shape[:2])
        assert_same(backend.histogram(w, p, params), reference_histogram(w, p, params))
        want = reference_histogram(w, p, params, mask)
        assert_same(backend.histogram(w, p, params, mask), want)


@pytest.mark.parametrize("chunk", [8, 9, 1000])
def test_cpu_chunk_boundaries_and_short_tails(monkeypatch: pytest.MonkeyPatch, chunk: int) -> None:
    """Chunks of any size, including tails shorter than OpenCV's scalar-like arrays."""
    from inference.spectrum import cpu

    monkeypatch.setattr(cpu, "RBHIST_CHUNK_PIXELS", chunk)
    rng = np.random.default_rng(chunk)
    w, p = simulated_pair(rng, 37, 29)  # 1073 pixels: tails of 1, 2 and 73 pixels
    mask = random_mask(rng, 37, 29)
    assert_same(cpu.numpy_histogram(w, p, RBHIST), reference_histogram(w, p, RBHIST))
    got = cpu.numpy_histogram(w, p, RBHIST, mask)
    assert_same(got, reference_histogram(w, p, RBHIST, mask))


@pytest.mark.parametrize("params", ALGOS)
def test_non_contiguous_inputs(backend: SpectrumBackend, params: Params) -> None:
    """Views (an RGB<->BGR flip, a crop) give the same result as their contiguous copies."""
    rng = np.random.default_rng(5)
    w, p = simulated_pair(rng, 40, 60)
    w_view, p_view = w[::-1, 5:50, ::-1], p[::-1, 5:50, ::-1]
    want = reference_histogram(np.ascontiguousarray(w_view), np.ascontiguousarray(p_view), params)
    assert_same(backend.histogram(w_view, p_view, params), want)


@pytest.mark.parametrize("params", ALGOS)
def test_slide_of_fields_of_changing_sizes(backend: SpectrumBackend, params: Params) -> None:
    """Fields of one slide, growing and shrinking (buffer reuse), with and without masks."""
    rng = np.random.default_rng(99)
    shapes = [(30, 40), (30, 40), (64, 80), (7, 9), (64, 80), (1, 1)]
    fields = [simulated_pair(rng, *s) for s in shapes]
    masks = [None if i % 2 else random_mask(rng, *s) for i, s in enumerate(shapes)]
    total = slide_histogram(backend, fields, params, masks)
    want = Histogram.empty(params)
    for (w, p), m in zip(fields, masks, strict=True):
        want = want + reference_histogram(w, p, params, m)
    assert_same(total, want)
    assert total.total_pixels == sum(h * w for h, w in shapes)
