"""The vectorised CPU spectrum backend.

Why it is fast compared with a literal transcription (``reference.py``):

* rows are processed in chunks, so the temporaries of a chunk stay in cache and the cost of
  each NumPy call is spread over many pixels (2**17 measured best on the reference machines);
* the interleaved RGB bytes are split into contiguous planes once (OpenCV), so every later
  operation runs at full SIMD width on int32 instead of on stride-3 uint8 views;
* invalid pixels are not compressed away but sent to an extra "dump" bin, which avoids four
  gather passes (their ``den`` is zeroed, the quotient becomes inf or NaN and ``np.fmin`` maps
  both to the dump bin; a masked assignment cost three times as much), and ``np.bincount``
  replaces the very slow ``np.add.at``; the sum and the count of a bin come out of one
  weighted bincount (see ``_PACK``);
* omis-rbhist-v1 needs no weights: its two histograms come from OpenCV's ``calcHist`` on
  uint16 planes (about 4x faster than ``np.bincount``), invalid pixels pushed out of its range;
* the bin index ``floor(a / b)`` with ``a = (num + den) * L <= 3.8e7`` and ``b = 2 den <= 520200``
  is computed as a float64 division: the true quotient is at least ``1/b`` below the next
  integer, far more than float64's rounding error, and an exact integer quotient is exactly
  representable, so the floor is exact;
* chunks can be shared between threads (``threads=`` or ``OMIS_SPECTRUM_THREADS``).

The result is bit-identical to the reference (tested on random and simulated images).
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import cv2
import numpy as np
import numpy.typing as npt

from inference.spectrum.params import RBHIST_BINS, RbhistParams, WdiffParams
from inference.spectrum.types import Histogram
from inference.spectrum.validate import U8, Mask, check_pair

CHUNK_PIXELS = 1 << 17  # omis-wdiff-v1, measured best (see the module docstring)
# omis-rbhist-v1 (measured best, too); below 2**24, so calcHist's float32 counts are exact
RBHIST_CHUNK_PIXELS = 1 << 18


# The two histograms of a chunk come from one weighted bincount: each pixel adds
# ``w + _SHIFT + _PACK``, so a bin's total is ``sum(w) + (_SHIFT + _PACK) * count``.  With
# ``w + _SHIFT`` in [514, 1534] and at most CHUNK_PIXELS pixels, the shifted sum stays below
# _PACK and the total below 2**53: both parts come back exactly from one float64.
_SHIFT = 1024
_PACK = float(1 << (((510 + _SHIFT) * CHUNK_PIXELS).bit_length()))


def _valid_chunk(
    w: U8, p: U8, mask: Mask | None, t_low: int, t_sat: int
) -> tuple[npt.NDArray[np.bool_], tuple[npt.NDArray[np.int32], ...]]:
    # Contiguous channel planes first (OpenCV's split, one SIMD pass per image): every later
    # operation then runs at full SIMD width instead of on stride-3 views, 3-6x faster each.
    r_w8, g_w8, b_w8 = cv2.split(w.reshape(-1, 1, 3))
    r_p8, g_p8, b_p8 = cv2.split(p.reshape(-1, 1, 3))
    brightest = np.maximum(r_w8, g_w8)  # max of all six channels < t_sat <=> none saturated
    for plane in (b_w8, r_p8, g_p8, b_p8):
        np.maximum(brightest, plane, out=brightest)
    valid = brightest < t_sat
    planes = tuple(c.reshape(-1).astype(np.int32) for c in (r_w8, b_w8, r_p8, b_p8))
    r_w, b_w, r_p, b_p = planes
    valid = valid.reshape(-1)
    s_w = r_w + b_w
    s_p = r_p + b_p
    valid &= s_w >= t_low
    valid &= s_p >= t_low
    if mask is not None:
        valid &= mask
    return valid, (*planes, s_w, s_p)


def _unpack(total: npt.NDArray[np.float64]) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    count = np.floor(total / _PACK)
    shifted = total - count * _PACK
    count_i = count.astype(np.int64)
    return shifted.astype(np.int64) - _SHIFT * count_i, count_i


def _wdiff_chunk(
    w: U8, p: U8, mask: Mask | None, params: WdiffParams
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    n_bins = params.bins
    valid, (r_w, b_w, r_p, b_p, s_w, s_p) = _valid_chunk(w, p, mask, params.t_low, params.t_sat)
    num = r_w * b_p
    num -= r_p * b_w
    den = s_w * s_p
    num += den
    # floor((num + den) * L / (2 den)); for even L the 2 cancels exactly (one pass fewer)
    if n_bins % 2 == 0:
        num *= n_bins // 2
    else:
        num *= n_bins
        den *= 2
    # Invalid pixels get den = 0, so their quotient is +inf or NaN (num + den >= 0 always),
    # which fmin sends to the dump bin n_bins + 1: cheaper than any masked assignment.  Valid
    # ones have den >= t_low**2 >= 1.  j == n_bins (num == den exactly) is counted in its own
    # bin and folded into the last one afterwards: cheaper than clipping every pixel.
    np.multiply(den, valid, out=den)
    with np.errstate(divide="ignore", invalid="ignore"):
        quotient = np.divide(num, den, dtype=np.float64)
    np.fmin(quotient, n_bins + 1, out=quotient)
    # intp: the index type bincount works in (an int32 index would be converted again)
    j = quotient.astype(np.intp)
    s_w -= s_p
    weights = np.add(s_w, _SHIFT + _PACK, dtype=np.float64)
    # numpy's stubs type bincount as integer even with float weights
    totals = np.asarray(np.bincount(j, weights=weights, minlength=n_bins + 2), dtype=np.float64)
    hist, count = _unpack(totals)
    hist[n_bins - 1] += hist[n_bins]
    count[n_bins - 1] += count[n_bins]
    return hist[: n_bins + 1].copy(), count[: n_bins + 1].copy()  # + the dump bin


def _rbhist_chunk(
    w: U8, p: U8, mask: Mask | None, params: RbhistParams
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    # 8/16-bit planes throughout; the histograms come from OpenCV's calcHist on uint16, about
    # 4x faster than np.bincount.  calcHist's mask would cost 5x its histogram, so invalid
    # pixels are instead pushed out of its range (to 0xFFFF), where it ignores them.
    r_w, g_w, b_w = (c.reshape(-1) for c in cv2.split(w.reshape(-1, 1, 3)))
    r_p, g_p, b_p = (c.reshape(-1) for c in cv2.split(p.reshape(-1, 1, 3)))
    brightest = np.maximum(r_w, g_w)
    for plane in (b_w, r_p, g_p, b_p):
        np.maximum(brightest, plane, out=brightest)
    invalid = brightest >= params.t_sat
    s_w = np.add(r_w, b_w, dtype=np.uint16)
    s_p = np.add(r_p, b_p, dtype=np.uint16)
    np.minimum(s_w, s_p, out=s_w)  # both sums >= t_low <=> the smaller one is
    invalid |= s_w < params.t_low
    if mask is not None:
        invalid |= ~mask
    push_out = np.multiply(invalid, np.uint16(0xFFFF), dtype=np.uint16)
    histograms = []
    for r, b in ((r_w, b_w), (r_p, b_p)):
        d = np.add(r, np.uint16(255), dtype=np.uint16)
        np.subtract(d, b, out=d)  # R - B + 255, in [0, 510]
        np.maximum(d, push_out, out=d)
        # one row: calcHist walks rows, and a (1, n) array runs 2-5x faster than (n,) or (n, 1)
        counts = cv2.calcHist([d.reshape(1, -1)], [0], None, [RBHIST_BINS], [0, RBHIST_BINS])
        # float32 counts are exact: a chunk has fewer than 2**24 pixels
        histograms.append(counts.reshape(-1).astype(np.int64))
    h_w, h_p = histograms
    dump = np.array([np.count_nonzero(invalid)], np.int64)
    return np.concatenate([h_w - h_p, [0]]), np.concatenate([h_w, dump])


def _default_threads() -> int:
    # One thread by default: np.bincount holds the GIL, so a second thread gained nothing on
    # the 2-core reference machine and competed with the acquisition thread of the pipeline.
    # OMIS_SPECTRUM_THREADS raises it on machines with spare cores.
    return max(1, int(os.environ.get("OMIS_SPECTRUM_THREADS", "1")))


def numpy_histogram(
    w: U8,
    p: U8,
    params: WdiffParams | RbhistParams,
    mask: Mask | None = None,
    threads: int | None = None,
) -> Histogram:
    """Histogram of one field pair, bit-identical to :func:`reference_histogram`."""
    w, p, mask = check_pair(w, p, mask)
    flat_w = np.ascontiguousarray(w).reshape(-1, 3)
    flat_p = np.ascontiguousarray(p).reshape(-1, 3)
    flat_m = None if mask is None else np.ascontiguousarray(mask).reshape(-1)
    n = flat_w.shape[0]
    chunk = CHUNK_PIXELS if isinstance(params, WdiffParams) else RBHIST_CHUNK_PIXELS
    starts = range(0, n, chunk)

    def run(start: int) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
        stop = min(start + chunk, n)
        m = None if flat_m is None else flat_m[start:stop]
        if isinstance(params, WdiffParams):
            return _wdiff_chunk(flat_w[start:stop], flat_p[start:stop], m, params)
        return _rbhist_chunk(flat_w[start:stop], flat_p[start:stop], m, params)

    n_threads = threads or _default_threads()
    size = params.n_bins + 1
    hist = np.zeros(size, np.int64)
    count = np.zeros(size, np.int64)
    if n_threads == 1 or len(starts) == 1:
        parts = map(run, starts)
        for h, c in parts:
            hist += h
            count += c
    else:
        with ThreadPoolExecutor(n_threads, thread_name_prefix="omis-spectrum") as pool:
            for h, c in pool.map(run, starts):
                hist += h
                count += c
    valid = int(count[:-1].sum())
    return Histogram(params.algorithm, hist[:-1].copy(), count[:-1].copy(), valid, n)
