"""A straightforward NumPy transcription of the definition in ``docs/spectrum.md``.

Kept deliberately plain: it is the oracle the fast CPU and CUDA backends are tested against
and the baseline the benchmark compares them with.  Not used on the device's hot path.
"""

from __future__ import annotations

import numpy as np

from inference.spectrum.params import RbhistParams, WdiffParams
from inference.spectrum.types import Histogram
from inference.spectrum.validate import U8, Mask, check_pair


def _valid(w: U8, p: U8, mask: Mask | None, params: WdiffParams | RbhistParams) -> Mask:
    wi = w.astype(np.int32)
    pi = p.astype(np.int32)
    s_w = wi[..., 0] + wi[..., 2]
    s_p = pi[..., 0] + pi[..., 2]
    valid = (s_w >= params.t_low) & (s_p >= params.t_low)
    valid &= wi.max(axis=2) < params.t_sat
    valid &= pi.max(axis=2) < params.t_sat
    if mask is not None:
        valid &= mask
    return np.asarray(valid, dtype=np.bool_)


def reference_histogram(
    w: U8, p: U8, params: WdiffParams | RbhistParams, mask: Mask | None = None
) -> Histogram:
    """The histogram of one field, computed literally as the definition reads."""
    w, p, mask = check_pair(w, p, mask)
    valid = _valid(w, p, mask, params)
    n_valid = int(valid.sum())
    total = int(valid.size)
    if isinstance(params, RbhistParams):
        d_w = w[..., 0].astype(np.int64) - w[..., 2].astype(np.int64)
        d_p = p[..., 0].astype(np.int64) - p[..., 2].astype(np.int64)
        h_w = np.zeros(511, np.int64)
        h_p = np.zeros(511, np.int64)
        np.add.at(h_w, d_w[valid] + 255, 1)
        np.add.at(h_p, d_p[valid] + 255, 1)
        return Histogram(params.algorithm, h_w - h_p, h_w, n_valid, total)
    r_w = w[..., 0].astype(np.int64)[valid]
    b_w = w[..., 2].astype(np.int64)[valid]
    r_p = p[..., 0].astype(np.int64)[valid]
    b_p = p[..., 2].astype(np.int64)[valid]
    s_w = r_w + b_w
    s_p = r_p + b_p
    num = r_w * b_p - r_p * b_w
    den = s_w * s_p
    n_bins = params.bins
    j = np.minimum((num + den) * n_bins // (2 * den), n_bins - 1)
    hist = np.zeros(n_bins, np.int64)
    count = np.zeros(n_bins, np.int64)
    np.add.at(hist, j, s_w - s_p)
    np.add.at(count, j, 1)
    return Histogram(params.algorithm, hist, count, n_valid, total)
