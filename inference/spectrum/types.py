"""The integer histogram a backend accumulates, and the finished spectrum derived from it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from inference.exceptions import SpectrumInputError
from inference.integrity import check_finite
from inference.spectrum.params import RbhistParams, WdiffParams

I64 = npt.NDArray[np.int64]
F64 = npt.NDArray[np.float64]
_INT64_MAX = np.iinfo(np.int64).max


@dataclass(frozen=True)
class Histogram:
    """Integer accumulators of one field or the sum over the fields of a slide.

    For ``omis-wdiff-v1``: ``hist[j]`` sums ``w = sW - sP`` and ``count[j]`` counts pixels in bin j.
    For ``omis-rbhist-v1``: ``hist[k] = h_W(k) - h_P(k)`` and ``count[k] = h_W(k)``.
    Histograms of the same algorithm add up exactly (``a + b``).
    """

    algorithm: str
    hist: I64
    count: I64
    valid_pixels: int
    total_pixels: int

    def __add__(self, other: Histogram) -> Histogram:
        if self.algorithm != other.algorithm or self.hist.shape != other.hist.shape:
            raise SpectrumInputError(
                f"cannot add histograms of {self.algorithm}/{self.hist.shape[0]} bins and "
                f"{other.algorithm}/{other.hist.shape[0]} bins"
            )
        return Histogram(
            self.algorithm,
            self.hist + other.hist,
            self.count + other.count,
            self.valid_pixels + other.valid_pixels,
            self.total_pixels + other.total_pixels,
        )

    @classmethod
    def empty(cls, params: WdiffParams | RbhistParams) -> Histogram:
        """A zero histogram, the neutral element of ``+``."""
        n = params.n_bins
        return cls(params.algorithm, np.zeros(n, np.int64), np.zeros(n, np.int64), 0, 0)

    def equals(self, other: Histogram) -> bool:
        """Bit-exact equality of every accumulator."""
        return (
            self.algorithm == other.algorithm
            and self.valid_pixels == other.valid_pixels
            and self.total_pixels == other.total_pixels
            and np.array_equal(self.hist, other.hist)
            and np.array_equal(self.count, other.count)
        )


@dataclass(frozen=True)
class Spectrum:
    """A finished spectrum: axis, values and the integer accumulators it came from."""

    params: WdiffParams | RbhistParams
    x_nm: F64
    y: F64
    hist: I64
    count: I64
    smoothed: I64
    valid_pixels: int
    total_pixels: int
    flags: tuple[str, ...]
    backend: str
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def algorithm(self) -> str:
        """The algorithm's versioned name."""
        return self.params.algorithm

    def to_json(self) -> dict[str, Any]:
        """The JSON object of ``omis spectrum --json``."""
        return {
            "algorithm": self.algorithm,
            "params": self.params.model_dump(),
            "x_nm": self.x_nm.tolist(),
            "y": self.y.tolist(),
            "hist": self.hist.tolist(),
            "count": self.count.tolist(),
            "smoothed": self.smoothed.tolist(),
            "valid_pixels": self.valid_pixels,
            "total_pixels": self.total_pixels,
            "flags": list(self.flags),
            "backend": self.backend,
            **self.extra,
        }


def binomial_kernel(n: int) -> I64:
    """C(2n, i) for i = 0..2n, exact int64."""
    row = np.array([1], dtype=np.int64)
    for _ in range(2 * n):
        row = np.convolve(row, np.array([1, 1], dtype=np.int64))
    return row


def smooth(hist: I64, n: int) -> I64:
    """Spectral convolution: binomial smoothing of 2n+1 taps, integers, zero padding."""
    bound = int(np.abs(hist).sum())
    if bound and bound > _INT64_MAX // (4**n):
        raise SpectrumInputError(
            f"n_smooth={n} would overflow int64 for a histogram of magnitude {bound}"
        )
    # The full convolution, cut to the axis: S[j] = full[j + n].  (mode="same" is the same cut
    # only while the kernel is no longer than the histogram; beyond that it returns 2n+1 values.)
    full = np.convolve(hist, binomial_kernel(n), mode="full")
    return full[n : n + hist.shape[0]].astype(np.int64, copy=False)


def axis_nm(params: WdiffParams | RbhistParams) -> F64:
    """Bin centres in nm."""
    span = params.span_nm
    if isinstance(params, WdiffParams):
        j = np.arange(params.bins, dtype=np.float64)
        return span * (-1.0 + (2.0 * j + 1.0) / params.bins)
    k = np.arange(-255, 256, dtype=np.float64)
    return k * span / 255.0


def finalize(h: Histogram, params: WdiffParams | RbhistParams, backend: str) -> Spectrum:
    """Turn accumulated integers into the spectrum (``S``, ``y``, ``x``; ``docs/spectrum.md``)."""
    if h.algorithm != params.algorithm or h.hist.shape[0] != params.n_bins:
        raise SpectrumInputError(
            f"histogram of {h.algorithm} does not match parameters of {params.algorithm}"
        )
    s = smooth(h.hist, params.n_smooth)
    flags: list[str] = []
    if h.valid_pixels == 0:
        y = np.zeros(params.n_bins, dtype=np.float64)
        flags.append("empty")
    else:
        y = s.astype(np.float64) / float(4**params.n_smooth) / float(h.valid_pixels)
    check_finite("spectrum", y, "spectrum values")
    return Spectrum(
        params=params,
        x_nm=axis_nm(params),
        y=y,
        hist=h.hist,
        count=h.count,
        smoothed=s,
        valid_pixels=h.valid_pixels,
        total_pixels=h.total_pixels,
        flags=tuple(flags),
        backend=backend,
    )
