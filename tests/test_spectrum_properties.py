"""Properties of the spectrum definition (docs/spectrum.md), checked with hypothesis on the CPU."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from inference.spectrum import axis_nm, compute_spectrum, finalize, parse_params
from inference.spectrum.cpu import numpy_histogram
from inference.spectrum.params import RbhistParams, WdiffParams
from inference.spectrum.reference import reference_histogram

U8 = npt.NDArray[np.uint8]
FAST = settings(max_examples=60, deadline=None)

shapes = st.tuples(st.integers(1, 9), st.integers(1, 9))
# Mostly mid-range colours (valid pixels), with dark and saturated values mixed in.
channel = st.one_of(st.integers(0, 255), st.integers(20, 230), st.integers(20, 230))


@st.composite
def image_pairs(draw: st.DrawFn) -> tuple[U8, U8]:
    h, w = draw(shapes)
    img = hnp.arrays(np.uint8, (h, w, 3), elements=channel)
    return draw(img), draw(img)


@st.composite
def any_params(draw: st.DrawFn) -> WdiffParams | RbhistParams:
    data: dict[str, Any] = {
        "algorithm": draw(st.sampled_from(["omis-wdiff-v1", "omis-rbhist-v1"])),
        "t_low": draw(st.integers(1, 60)),
        "t_sat": draw(st.integers(200, 256)),
        "n_smooth": draw(st.integers(0, 10)),
    }
    if data["algorithm"] == "omis-wdiff-v1":
        data["bins"] = draw(st.integers(2, 600))
    return parse_params(data)


def on_bin_edge(w: U8, p: U8, n_bins: int) -> npt.NDArray[np.bool_]:
    """Pixels whose bin position (num + den) L / (2 den) is an exact integer."""
    r_w, b_w = w[..., 0].astype(np.int64), w[..., 2].astype(np.int64)
    r_p, b_p = p[..., 0].astype(np.int64), p[..., 2].astype(np.int64)
    den = (r_w + b_w) * (r_p + b_p)
    num = r_w * b_p - r_p * b_w
    return np.asarray((num + den) * n_bins % np.maximum(2 * den, 1) == 0)


@FAST
@given(image_pairs(), any_params())
def test_fast_backend_equals_reference(pair: tuple[U8, U8], params: Any) -> None:
    w, p = pair
    assert numpy_histogram(w, p, params).equals(reference_histogram(w, p, params))


@FAST
@given(image_pairs(), any_params(), st.data())
def test_fast_backend_equals_reference_with_mask(
    pair: tuple[U8, U8], params: Any, data: st.DataObject
) -> None:
    w, p = pair
    mask = data.draw(hnp.arrays(np.bool_, w.shape[:2]))
    assume(mask.any())
    assert numpy_histogram(w, p, params, mask).equals(reference_histogram(w, p, params, mask))


@FAST
@given(image_pairs(), any_params())
def test_identical_images_give_zero_spectrum(pair: tuple[U8, U8], params: Any) -> None:
    w, _ = pair
    spectrum = compute_spectrum([(w, w.copy())], params, backend="numpy")
    assert not spectrum.hist.any()
    assert not spectrum.y.any()
    assert spectrum.y.dtype == np.float64


@FAST
@given(image_pairs(), st.integers(2, 600))
def test_swapping_w_and_p_negates_and_mirrors_wdiff(pair: tuple[U8, U8], bins: int) -> None:
    w, p = pair
    params = parse_params({"bins": bins})
    mask = ~on_bin_edge(w, p, bins)  # edge pixels do not mirror exactly (floor vs ceil)
    assume(mask.any())
    fwd = numpy_histogram(w, p, params, mask)
    rev = numpy_histogram(p, w, params, mask)
    np.testing.assert_array_equal(rev.hist, -fwd.hist[::-1])
    np.testing.assert_array_equal(rev.count, fwd.count[::-1])
    assert rev.valid_pixels == fwd.valid_pixels


def test_bin_edge_pixels_are_the_exception_to_mirroring() -> None:
    """W == P puts every pixel exactly on the edge L/2, which does not mirror to L/2 - 1."""
    w = np.full((2, 2, 3), 100, np.uint8)
    params = parse_params({"bins": 290})
    h = numpy_histogram(w, w, params)
    assert np.flatnonzero(h.count).tolist() == [145]
    assert on_bin_edge(w, w, 290).all()


@FAST
@given(image_pairs())
def test_swapping_w_and_p_negates_rbhist(pair: tuple[U8, U8]) -> None:
    w, p = pair
    params = parse_params({"algorithm": "omis-rbhist-v1"})
    fwd = numpy_histogram(w, p, params)
    rev = numpy_histogram(p, w, params)
    np.testing.assert_array_equal(rev.hist, -fwd.hist)
    np.testing.assert_array_equal(rev.count, fwd.count - fwd.hist)  # h_P = h_W - (h_W - h_P)


@FAST
@given(image_pairs())
def test_rbhist_sums_to_zero(pair: tuple[U8, U8]) -> None:
    h = numpy_histogram(*pair, parse_params({"algorithm": "omis-rbhist-v1"}))
    assert int(h.hist.sum()) == 0
    assert int(h.count.sum()) == h.valid_pixels


@FAST
@given(image_pairs(), any_params())
def test_smoothing_keeps_the_total_away_from_the_ends(pair: tuple[U8, U8], params: Any) -> None:
    h = numpy_histogram(*pair, params)
    n = params.n_smooth
    nonzero = np.flatnonzero(h.hist)
    assume(nonzero.size > 0 and n <= nonzero[0] and nonzero[-1] < h.hist.size - n)
    s = finalize(h, params, "numpy").smoothed
    assert int(s.sum()) == 4**n * int(h.hist.sum())


@FAST
@given(st.lists(image_pairs(), min_size=1, max_size=4), any_params())
def test_field_histograms_sum_to_one_histogram(fields: list[tuple[U8, U8]], params: Any) -> None:
    total = None
    for w, p in fields:
        h = numpy_histogram(w, p, params)
        total = h if total is None else total + h
    assert total is not None
    w_all = np.concatenate([w.reshape(-1, 1, 3) for w, _ in fields])
    p_all = np.concatenate([p.reshape(-1, 1, 3) for _, p in fields])
    assert total.equals(reference_histogram(w_all, p_all, params))


@FAST
@given(image_pairs(), any_params())
def test_accumulators_are_consistent_integers(pair: tuple[U8, U8], params: Any) -> None:
    w, p = pair
    h = numpy_histogram(w, p, params)
    assert h.hist.dtype == np.int64 and h.count.dtype == np.int64
    assert h.hist.shape == h.count.shape == (params.n_bins,)
    assert (h.count >= 0).all()
    assert int(h.count.sum()) == h.valid_pixels <= h.total_pixels == w.shape[0] * w.shape[1]
    if isinstance(params, WdiffParams):
        assert abs(int(h.hist.sum())) <= 510 * h.valid_pixels
    s = finalize(h, params, "numpy")
    assert s.smoothed.dtype == np.int64


@FAST
@given(st.tuples(st.integers(1, 6), st.integers(1, 6)), any_params(), st.data())
def test_no_valid_pixel_gives_empty_flag(
    shape: tuple[int, int], params: Any, data: st.DataObject
) -> None:
    saturated = hnp.arrays(np.uint8, (*shape, 3), elements=st.integers(0, 255))
    w = data.draw(saturated)
    w[..., 1] = 255  # green at 255 saturates every pixel, whatever t_sat is allowed to be
    p = data.draw(saturated)
    if params.t_sat == 256:
        w[..., 0] = w[..., 2] = 0  # ... except t_sat=256: make them too dark instead
        params = params.model_copy(update={"t_low": max(params.t_low, 1)})
    spectrum = compute_spectrum([(w, p)], params, backend="numpy")
    assert spectrum.valid_pixels == 0
    assert "empty" in spectrum.flags
    assert not spectrum.y.any() and not spectrum.hist.any()


def test_axis_defaults_are_bin_centres() -> None:
    x = axis_nm(parse_params())
    assert x.shape == (290,)
    np.testing.assert_allclose(x, np.arange(-144.5, 145.0), rtol=0, atol=1e-9)
    np.testing.assert_allclose(x, -x[::-1], rtol=0, atol=1e-9)
    xr = axis_nm(parse_params({"algorithm": "omis-rbhist-v1"}))
    assert xr.shape == (511,)
    np.testing.assert_allclose(xr[[0, 255, 510]], [-145.0, 0.0, 145.0], rtol=0, atol=1e-9)


@pytest.mark.parametrize("algorithm", ["omis-wdiff-v1", "omis-rbhist-v1"])
def test_y_is_smoothed_histogram_over_n(algorithm: str) -> None:
    rng = np.random.default_rng(1)
    w = rng.integers(30, 200, (8, 8, 3), dtype=np.uint8)
    p = rng.integers(30, 200, (8, 8, 3), dtype=np.uint8)
    params = parse_params({"algorithm": algorithm, "n_smooth": 2})
    s = compute_spectrum([(w, p)], params, backend="numpy")
    kernel = np.array([1, 4, 6, 4, 1])
    want = np.convolve(s.hist, kernel, mode="same") / 16 / s.valid_pixels
    np.testing.assert_array_equal(s.smoothed, np.convolve(s.hist, kernel, mode="same"))
    np.testing.assert_allclose(s.y, want, rtol=1e-15)


@FAST
@given(image_pairs(), st.integers(2, 40), st.integers(0, 12))
def test_smoothing_follows_the_definition_for_any_kernel_width(
    pair: tuple[U8, U8], bins: int, n: int
) -> None:
    """S[j] = sum_i C(2n, i) hist[j + i - n], zero outside the axis, also when 2n + 1 > L."""
    params = parse_params({"bins": bins, "n_smooth": n})
    s = compute_spectrum([pair], params, backend="numpy")
    taps = [math.comb(2 * n, i) for i in range(2 * n + 1)]
    hist = [int(v) for v in s.hist]
    want = [
        sum(c * hist[j + i - n] for i, c in enumerate(taps) if 0 <= j + i - n < bins)
        for j in range(bins)
    ]
    assert s.smoothed.tolist() == want
    assert s.y.shape == s.x_nm.shape == (bins,)
