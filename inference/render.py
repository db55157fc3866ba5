"""Spectrum -> image for the CNN, deterministic to the byte (see ``docs/spectrum.md``).

The training side and the device both call :func:`render_spectrum` with the
:class:`RenderParams` recorded in the model bundle: one preprocessing, no drift.

Why a hand-written rasteriser instead of matplotlib or OpenCV's anti-aliased lines: the image
must be identical on every machine and every library version (x86 training hosts, ARM Jetsons).
Everything below uses only NumPy ufuncs that IEEE 754 defines exactly (``+ - * /``, ``sqrt``,
``min``/``max``, comparisons), one operation per ufunc call, so no compiler can fuse a
multiply-add differently on another CPU; coverage becomes an integer alpha before it is blended
in integers.  Version ``omis-render-v1`` of this drawing must never change: a new look is a new
version name.
"""

from __future__ import annotations

import logging
import math
from typing import Annotated, Any, Literal

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from firmware_bridge.validation import first_error
from inference.exceptions import SpectrumInputError

log = logging.getLogger(__name__)

F64 = npt.NDArray[np.float64]
U8 = npt.NDArray[np.uint8]

RENDER_VERSIONS = ("omis-render-v1",)

# Fixed y-range of the default parameters, in the units of ``Spectrum.y`` of omis-wdiff-v1
# (W - P intensity per valid pixel and bin).  Simulated slides peak at 16.5-22.7 (all groups,
# 124 fields); this leaves ~25% headroom above and room for negative lobes below zero.  The
# reasoning is in docs/spectrum.md ("Choosing the y-range").
DEFAULT_Y_RANGE = (-4.0, 28.0)

Channel = Annotated[int, Field(ge=0, le=255)]
RGB = tuple[Channel, Channel, Channel]


class RenderParams(BaseModel):
    """Every parameter of the spectrum image; bundles record ``model_dump()`` of this model."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, frozen=True)

    version: Literal["omis-render-v1"] = Field(
        "omis-render-v1", description="drawing algorithm; a new look is a new version"
    )
    width: int = Field(224, ge=16, le=4096, description="image width in pixels")
    height: int = Field(224, ge=16, le=4096, description="image height in pixels")
    margin_px: int = Field(
        4,
        ge=0,
        le=64,
        description="blank border around the plot area, so a thick line at the "
        "edge of the range is not cut in half",
    )
    x_range_nm: tuple[float, float] | None = Field(
        None, description="x-axis ends in nm; None: the spectrum's first and last axis points"
    )
    y_range: tuple[float, float] | Literal["auto"] = Field(
        DEFAULT_Y_RANGE,
        description="y-axis ends; values outside are clipped to the edge.  'auto' scales each "
        "spectrum to its own min/max, which throws away the amplitude (not the default)",
    )
    line_width: int = Field(2, ge=1, le=16, description="width of the spectrum line in pixels")
    antialias: bool = Field(True, description="anti-aliased (grey-level) edges of the line")
    line_rgb: RGB = Field((0, 0, 0), description="colour of the spectrum line")
    background_rgb: RGB = Field((255, 255, 255), description="colour of the background")
    axis_rgb: RGB = Field((128, 128, 128), description="colour of the axes and the zero line")
    fill_rgb: RGB = Field((190, 190, 190), description="colour of the area under the curve")
    draw_axes: bool = Field(True, description="left and bottom edges of the plot area")
    draw_zero_line: bool = Field(True, description="horizontal line at y = 0 when in range")
    fill_under: bool = Field(False, description="fill between the curve and y = 0")

    @model_validator(mode="after")
    def _check(self) -> RenderParams:
        if self.x_range_nm is not None:
            _check_range("x_range_nm", self.x_range_nm)
        if self.y_range != "auto":
            _check_range("y_range", self.y_range)
        if min(self.width, self.height) - 2 * self.margin_px < 8:
            raise ValueError("margin_px leaves a plot area under 8 pixels")
        return self


def _check_range(name: str, bounds: tuple[float, float]) -> None:
    lo, hi = bounds
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError(f"{name} must be finite, got {bounds}")
    if lo >= hi:
        raise ValueError(f"{name} must be increasing (low < high), got {bounds}")


def render_params_from_json(d: dict[str, Any] | None) -> RenderParams:
    """Validate render parameters from a bundle manifest or the command line.

    Raises :class:`SpectrumInputError` naming the offending key.
    """
    data = dict(d or {})
    version = data.get("version", RENDER_VERSIONS[0])
    if version not in RENDER_VERSIONS:
        raise SpectrumInputError(
            f"unsupported render version {version!r}; known: {', '.join(RENDER_VERSIONS)}"
        )
    try:
        return RenderParams.model_validate(data)
    except ValidationError as exc:
        raise SpectrumInputError(f"bad render parameter {first_error(exc, 'render')}") from exc


def _check_inputs(x_nm: object, y: object) -> tuple[F64, F64]:
    x = np.asarray(x_nm, dtype=np.float64)
    v = np.asarray(y, dtype=np.float64)
    if x.ndim != 1 or v.ndim != 1:
        raise SpectrumInputError(f"x_nm and y must be 1-D, got shapes {x.shape} and {v.shape}")
    if x.shape != v.shape:
        raise SpectrumInputError(f"x_nm and y differ in length: {x.size} vs {v.size}")
    if x.size < 2:
        raise SpectrumInputError(f"a spectrum needs at least 2 points, got {x.size}")
    for name, arr in (("x_nm", x), ("y", v)):
        bad = ~np.isfinite(arr)
        if bad.any():
            kinds = "NaN" if np.isnan(arr).any() else "inf"
            raise SpectrumInputError(
                f"{name} contains {int(bad.sum())} non-finite value(s) ({kinds}), "
                f"first at index {int(np.argmax(bad))}"
            )
    if not bool(np.all(np.diff(x) > 0)):
        raise SpectrumInputError("x_nm must be strictly increasing")
    return x, v


def _ranges(
    x: F64, y: F64, params: RenderParams
) -> tuple[tuple[float, float], tuple[float, float]]:
    x_range = params.x_range_nm or (float(x[0]), float(x[-1]))
    if params.y_range != "auto":
        return x_range, params.y_range
    lo, hi = float(y.min()), float(y.max())
    if hi - lo < 1e-12:  # a flat spectrum: centre it in a unit band
        return x_range, (lo - 0.5, hi + 0.5)
    pad = (hi - lo) * 0.05
    return x_range, (lo - pad, hi + pad)


class _Canvas:
    """Plot-area geometry and integer alpha blending onto an RGB image."""

    def __init__(
        self, params: RenderParams, x_range: tuple[float, float], y_range: tuple[float, float]
    ):
        self.p = params
        self.x_range = x_range
        self.y_range = y_range
        self.left = params.margin_px
        self.top = params.margin_px
        self.right = params.width - 1 - params.margin_px  # inclusive pixel index
        self.bottom = params.height - 1 - params.margin_px
        self.image = np.empty((params.height, params.width, 3), dtype=np.uint8)
        self.image[...] = np.array(params.background_rgb, dtype=np.uint8)

    def to_px(self, x: F64, y: F64) -> tuple[F64, F64]:
        """Data -> pixel-centre coordinates; y is clipped to the range (documented)."""
        x0, x1 = self.x_range
        y0, y1 = self.y_range
        yc = np.minimum(np.maximum(y, y0), y1)
        px = np.multiply(np.divide(np.subtract(x, x0), x1 - x0), float(self.right - self.left))
        py = np.multiply(np.divide(np.subtract(y1, yc), y1 - y0), float(self.bottom - self.top))
        return np.add(px, float(self.left)), np.add(py, float(self.top))

    def zero_row(self) -> float | None:
        """Pixel row of y = 0, or None when 0 is outside the y-range."""
        y0, y1 = self.y_range
        if not y0 <= 0.0 <= y1:
            return None
        _, py = self.to_px(np.array([self.x_range[0]]), np.array([0.0]))
        return float(py[0])

    def blend(self, rows: slice, cols: slice, alpha: npt.NDArray[np.int32], rgb: RGB) -> None:
        """Integer "over" blending: out = (bg * (255 - a) + fg * a + 127) // 255."""
        region = self.image[rows, cols].astype(np.int32)
        a = alpha[..., None]
        fg = np.array(rgb, dtype=np.int32)
        out = (region * (255 - a) + fg * a + 127) // 255
        self.image[rows, cols] = out.astype(np.uint8)

    def paint(self, rows: slice, cols: slice, rgb: RGB) -> None:
        """Opaque fill of a rectangle of pixels."""
        self.image[rows, cols] = np.array(rgb, dtype=np.uint8)


def _segment_distance(gx: F64, gy: F64, a: tuple[float, float], b: tuple[float, float]) -> F64:
    """Distance from pixel centres (gx, gy) to the segment a-b, one exact ufunc per step."""
    (ax, ay), (bx, by) = a, b
    dx, dy = bx - ax, by - ay
    length2 = dx * dx + dy * dy
    rx = np.subtract(gx, ax)
    ry = np.subtract(gy, ay)
    if length2 > 0.0:
        t = np.add(np.multiply(rx, dx), np.multiply(ry, dy))
        t = np.divide(t, length2)
        t = np.minimum(np.maximum(t, 0.0), 1.0)
        rx = np.subtract(rx, np.multiply(t, dx))
        ry = np.subtract(ry, np.multiply(t, dy))
    d2: F64 = np.add(np.multiply(rx, rx), np.multiply(ry, ry))
    return np.sqrt(d2)


def _draw_polyline(canvas: _Canvas, px: F64, py: F64) -> None:
    """Rasterise the curve by its distance field inside the plot area, then blend once."""
    p = canvas.p
    half = p.line_width / 2.0
    reach = half + 1.0
    h = canvas.bottom - canvas.top + 1
    w = canvas.right - canvas.left + 1
    dist = np.full((h, w), np.inf, dtype=np.float64)
    for i in range(px.size - 1):
        ax, ay, bx, by = float(px[i]), float(py[i]), float(px[i + 1]), float(py[i + 1])
        c0 = max(canvas.left, math.floor(min(ax, bx) - reach))
        c1 = min(canvas.right, math.ceil(max(ax, bx) + reach))
        r0 = max(canvas.top, math.floor(min(ay, by) - reach))
        r1 = min(canvas.bottom, math.ceil(max(ay, by) + reach))
        if c0 > c1 or r0 > r1:
            continue  # the segment lies outside the x-range
        gx = np.arange(c0, c1 + 1, dtype=np.float64)[None, :]
        gy = np.arange(r0, r1 + 1, dtype=np.float64)[:, None]
        d = _segment_distance(gx, gy, (ax, ay), (bx, by))
        view = dist[r0 - canvas.top : r1 - canvas.top + 1, c0 - canvas.left : c1 - canvas.left + 1]
        np.minimum(view, d, out=view)
    if p.antialias:
        cover = np.minimum(np.maximum(np.subtract(half + 0.5, dist), 0.0), 1.0)
        alpha = np.floor(np.add(np.multiply(cover, 255.0), 0.5)).astype(np.int32)
    else:
        alpha = np.where(dist <= half, 255, 0).astype(np.int32)
    rows = slice(canvas.top, canvas.bottom + 1)
    cols = slice(canvas.left, canvas.right + 1)
    canvas.blend(rows, cols, alpha, p.line_rgb)


def _curve_at_columns(canvas: _Canvas, px: F64, py: F64) -> F64:
    """Row of the curve at each plot-area column centre (linear between points, exact ufuncs)."""
    cols = np.arange(canvas.left, canvas.right + 1, dtype=np.float64)
    cols = np.minimum(np.maximum(cols, px[0]), px[-1])
    k = np.searchsorted(px, cols, side="right") - 1
    k = np.minimum(np.maximum(k, 0), px.size - 2)
    x0, x1, y0, y1 = px[k], px[k + 1], py[k], py[k + 1]
    t = np.divide(np.subtract(cols, x0), np.maximum(np.subtract(x1, x0), 1e-300))
    rows: F64 = np.add(y0, np.multiply(t, np.subtract(y1, y0)))
    return rows


def _fill_under(canvas: _Canvas, px: F64, py: F64) -> None:
    """Opaque fill between the curve and y = 0 (or the nearer edge of the range)."""
    zero = canvas.zero_row()
    if zero is None:
        zero = float(canvas.bottom) if canvas.y_range[0] > 0.0 else float(canvas.top)
    curve = _curve_at_columns(canvas, px, py)
    rows = np.arange(canvas.top, canvas.bottom + 1, dtype=np.float64)[:, None]
    lo = np.minimum(curve, zero)[None, :]
    hi = np.maximum(curve, zero)[None, :]
    inside = (rows >= lo) & (rows <= hi)
    inside &= (px[0] <= np.arange(canvas.left, canvas.right + 1))[None, :]
    inside &= (np.arange(canvas.left, canvas.right + 1) <= px[-1])[None, :]
    region = canvas.image[canvas.top : canvas.bottom + 1, canvas.left : canvas.right + 1]
    region[inside] = np.array(canvas.p.fill_rgb, dtype=np.uint8)


def _draw_guides(canvas: _Canvas) -> None:
    """Zero line and axes: one-pixel opaque lines on the pixel grid."""
    p = canvas.p
    cols = slice(canvas.left, canvas.right + 1)
    if p.draw_zero_line:
        zero = canvas.zero_row()
        if zero is not None:
            row = math.floor(zero + 0.5)
            canvas.paint(slice(row, row + 1), cols, p.axis_rgb)
    if p.draw_axes:
        canvas.paint(
            slice(canvas.top, canvas.bottom + 1), slice(canvas.left, canvas.left + 1), p.axis_rgb
        )
        canvas.paint(slice(canvas.bottom, canvas.bottom + 1), cols, p.axis_rgb)


def render_spectrum(x_nm: object, y: object, params: RenderParams | None = None) -> U8:
    """Draw a spectrum as an H×W×3 RGB uint8 image, identical to the byte on every machine.

    ``y`` values outside ``params.y_range`` are clipped to its edges (the line runs along the
    top or bottom of the plot area).  NaN or inf in ``x_nm`` or ``y``, lengths that differ, fewer
    than 2 points or an axis that is not strictly increasing raise :class:`SpectrumInputError`.
    """
    params = params or RenderParams()
    x, v = _check_inputs(x_nm, y)
    x_range, y_range = _ranges(x, v, params)
    canvas = _Canvas(params, x_range, y_range)
    px, py = canvas.to_px(x, v)
    if params.fill_under:
        _fill_under(canvas, px, py)
    _draw_guides(canvas)
    _draw_polyline(canvas, px, py)
    return canvas.image


def fit_y_range(ys: object, coverage: float = 0.999, pad: float = 0.1) -> tuple[float, float]:
    """A fixed y-range holding ``coverage`` of the values in ``ys`` and y = 0, widened by ``pad``.

    For training: fit it once on the training spectra and record it in the bundle's render
    parameters, so every image of that model uses the same scale.
    """
    values = np.asarray(ys, dtype=np.float64).ravel()
    if values.size == 0 or not np.all(np.isfinite(values)):
        raise SpectrumInputError("fit_y_range needs finite values")
    if not 0.5 < coverage <= 1.0:
        raise SpectrumInputError(f"coverage must be in (0.5, 1], got {coverage}")
    lo = min(0.0, float(np.quantile(values, 1.0 - coverage)))
    hi = max(0.0, float(np.quantile(values, coverage)))
    span = max(hi - lo, 1e-6)
    return (lo - pad * span, hi + pad * span)


def fit_x_range(
    x_nm: object, ys: object, fraction: float = 0.01, pad: float = 0.15
) -> tuple[float, float]:
    """The part of the axis where the spectra live, widened by ``pad`` of its width.

    ``ys`` holds one spectrum per row over the common axis ``x_nm``.  The support is where the
    mean absolute spectrum exceeds ``fraction`` of its maximum.  OMIS spectra of one instrument
    occupy a small part of the full ±D axis; drawing only that part gives the CNN its peaks at
    a usable resolution.  Fitted once on the training spectra and recorded in the bundle.
    """
    x = np.asarray(x_nm, dtype=np.float64).ravel()
    y = np.atleast_2d(np.asarray(ys, dtype=np.float64))
    if y.shape[-1] != x.size or x.size < 2 or not np.all(np.isfinite(y)):
        raise SpectrumInputError("fit_x_range needs finite spectra over the given axis")
    if not 0.0 < fraction < 1.0:
        raise SpectrumInputError(f"fraction must be in (0, 1), got {fraction}")
    level = np.abs(y).mean(axis=0)
    if level.max() <= 0.0:
        return (float(x[0]), float(x[-1]))
    inside = np.flatnonzero(level >= fraction * level.max())
    lo, hi = float(x[inside[0]]), float(x[inside[-1]])
    width = max(hi - lo, float(x[1] - x[0]))
    return (max(float(x[0]), lo - pad * width), min(float(x[-1]), hi + pad * width))


def mass_outside_fraction(x_nm: object, y: object, params: RenderParams) -> float:
    """Fraction of the spectrum's absolute mass ``sum |y|`` at axis points outside the window.

    The window is ``params.x_range_nm`` (the whole axis when None: fraction 0).  A spectrum
    whose mass lies mostly outside the window the model was trained on is unlike the training
    data; the bundle's ``thresholds.out_of_range`` says how much is too much.
    """
    x, v = _check_inputs(x_nm, y)
    if params.x_range_nm is None:
        return 0.0
    lo, hi = params.x_range_nm
    mass = np.abs(v)
    total = float(mass.sum())
    if total <= 0.0:
        return 0.0
    outside = (x < lo) | (x > hi)
    return float(mass[outside].sum()) / total


def out_of_range(
    x_nm: object, y: object, params: RenderParams, threshold: float | None
) -> tuple[float, bool]:
    """(fraction of mass outside the window, whether it exceeds ``threshold``; None: never)."""
    frac = mass_outside_fraction(x_nm, y, params)
    return frac, threshold is not None and frac > threshold
