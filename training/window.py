"""The render window and the network inputs, fitted on training slides only.

Rule (``docs/training.md``): for every class, take the absolute spectral mass ``sum |y|`` of
its training slides per axis point; the x-window is the smallest interval from the first to the
last point such that each class keeps at least ``coverage`` (99 %) of its mass inside, with
the excluded mass split evenly between the two tails; the window is the union over the
classes.  Labels are used, so the window is fitted inside each training fold and never sees a
test slide.  The y-range is then fitted on the training values inside the window.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from inference.bundle import InputSpec, Normalization
from inference.preprocess import spectrum_to_tensor, to_tensor
from inference.render import RenderParams, fit_y_range, mass_outside_fraction, render_spectrum
from training.exceptions import DataError

F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]
U8 = npt.NDArray[np.uint8]

COVERAGE = 0.99
DISCRIMINATIVE_COVERAGE = 0.95
SPECTRUM_SCALE_QUANTILE = 0.99


def fit_render_window(
    x_nm: F64, ys: F64, labels: I64, coverage: float = COVERAGE
) -> tuple[float, float]:
    """The x-window keeping at least ``coverage`` of every class's absolute spectral mass."""
    x = np.asarray(x_nm, dtype=np.float64)
    y = np.atleast_2d(np.asarray(ys, dtype=np.float64))
    if y.shape[1] != x.size or y.shape[0] != labels.size or y.shape[0] == 0:
        raise DataError("fit_render_window: spectra, axis and labels do not match")
    tail = (1.0 - coverage) / 2.0
    lo_i, hi_i = x.size - 1, 0
    for c in np.unique(labels):
        mass = np.abs(y[labels == c]).sum(axis=0)
        total = float(mass.sum())
        if total <= 0.0:
            continue
        cum = np.cumsum(mass) / total
        # mass strictly before lo_c is < tail, strictly after hi_c is <= tail
        lo_c = int(np.searchsorted(cum, tail, side="left"))
        hi_c = int(np.searchsorted(cum, 1.0 - tail, side="left"))
        lo_i, hi_i = min(lo_i, lo_c), max(hi_i, min(hi_c, x.size - 1))
    d_lo, d_hi = _central_interval(discriminative_weight(y, labels), DISCRIMINATIVE_COVERAGE)
    if d_lo <= d_hi:
        lo_i, hi_i = min(lo_i, d_lo), max(hi_i, d_hi)
    if lo_i >= hi_i:
        return (float(x[0]), float(x[-1]))
    step = float(x[1] - x[0])  # half a bin of margin: a point on the edge stays inside
    return (
        max(float(x[0]), float(x[lo_i]) - step / 2),
        min(float(x[-1]), float(x[hi_i]) + step / 2),
    )


def discriminative_weight(ys: F64, labels: I64) -> F64:
    """Per axis point: between-class share of variance (eta squared) above chance, >= 0."""
    y = np.atleast_2d(np.asarray(ys, dtype=np.float64))
    classes = np.unique(labels)
    n = y.shape[0]
    if classes.size < 2 or n <= classes.size:
        return np.zeros(y.shape[1])
    grand = y.mean(axis=0)
    total = ((y - grand) ** 2).sum(axis=0)
    between = sum((labels == c).sum() * (y[labels == c].mean(axis=0) - grand) ** 2 for c in classes)
    with np.errstate(invalid="ignore", divide="ignore"):
        eta2 = np.where(total > 0, between / total, 0.0)
    chance = (classes.size - 1) / (n - 1)
    out: F64 = np.clip(eta2 - chance, 0.0, None)
    return out


def _central_interval(weight: F64, coverage: float) -> tuple[int, int]:
    """Indices of the smallest central interval holding ``coverage`` of ``weight`` (lo > hi:
    no weight at all)."""
    total = float(weight.sum())
    if total <= 0.0:
        return 1, 0
    cum = np.cumsum(weight) / total
    tail = (1.0 - coverage) / 2.0
    lo = int(np.searchsorted(cum, tail, side="left"))
    hi = int(np.searchsorted(cum, 1.0 - tail, side="left"))
    return lo, min(hi, weight.size - 1)


def discriminative_coverage(x_nm: F64, ys: F64, labels: I64, render: RenderParams) -> float | None:
    """Share of the discriminative weight (see the module doc) inside the render window."""
    weight = discriminative_weight(ys, labels)
    total = float(weight.sum())
    if total <= 0.0 or render.x_range_nm is None:
        return None
    lo, hi = render.x_range_nm
    x = np.asarray(x_nm, dtype=np.float64)
    return float(weight[(x >= lo) & (x <= hi)].sum()) / total


def render_coverage(
    x_nm: F64, ys: F64, labels: I64, classes: Sequence[str], render: RenderParams
) -> dict[str, float | None]:
    """For each class: the fraction of its absolute spectral mass inside the render window."""
    out: dict[str, float | None] = {}
    y = np.atleast_2d(np.asarray(ys, dtype=np.float64))
    for c, name in enumerate(classes):
        sel = y[labels == c]
        if sel.shape[0] == 0:
            out[name] = None
            continue
        out[name] = 1.0 - mass_outside_fraction(x_nm, np.abs(sel).sum(axis=0), render)
    return out


@dataclass(frozen=True)
class Inputs:
    """Network inputs of every slide and the parameters they were made with."""

    render: RenderParams
    spec: InputSpec
    inputs: F32


def spectrum_spec(ys: F64) -> InputSpec:
    """Input spec of a spectrum model: N×1×1×L, scaled so training values are about ±1."""
    scale = float(np.quantile(np.abs(ys), SPECTRUM_SCALE_QUANTILE))
    scale = 1.0 / scale if scale > 0.0 else 1.0
    return InputSpec(
        representation="spectrum",
        shape=(-1, 1, 1, int(ys.shape[1])),
        normalization=Normalization(scale=scale, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0)),
    )


def fit_inputs(
    x_nm: F64,
    ys: F64,
    labels: I64,
    fit_idx: I64,
    *,
    size: tuple[int, int],
    representation: str,
) -> Inputs:
    """Fit the window (and the spectrum scale) on ``fit_idx``; make the inputs of every slide."""
    h, w = size
    x_range = fit_render_window(x_nm, ys[fit_idx], labels[fit_idx])
    inside = (x_nm >= x_range[0]) & (x_nm <= x_range[1])
    y_range = fit_y_range(ys[fit_idx][:, inside])
    if representation == "spectrum":
        # not drawn for the model: the window still defines out_of_range on the device
        render = RenderParams(x_range_nm=x_range, y_range=y_range)
        spec = spectrum_spec(ys[fit_idx])
        return Inputs(render, spec, spectrum_to_tensor(list(ys), spec))
    render = RenderParams(width=w, height=h, x_range_nm=x_range, y_range=y_range)
    spec = InputSpec(shape=(-1, 3, h, w))
    images = [render_spectrum(x_nm, y, render) for y in ys]
    return Inputs(render, spec, to_tensor(images, spec))


def image_inputs(images: Sequence[U8], render: RenderParams) -> Inputs:
    """Inputs of an image dataset: drawn elsewhere with ``render`` (which the bundle records)."""
    if any(img.shape != (render.height, render.width, 3) for img in images):
        shapes = sorted({str(img.shape) for img in images})
        raise DataError(
            f"image dataset: images of shape {', '.join(shapes)} do not match the render "
            f"parameters ({render.height}, {render.width}, 3)"
        )
    spec = InputSpec(shape=(-1, 3, render.height, render.width))
    return Inputs(render, spec, to_tensor(list(images), spec))
