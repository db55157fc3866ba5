"""Per-field quality control, and the slide spectrum over the fields that pass it.

Checks (see ``docs/spectrum.md``): valid fraction under the spectrum's own validity rule, dark
and saturated fractions, a focus measure and a W/P registration check.  Every limit is relative
to the field, never a pixel count, so a 640x480 and a 5 MP frame of the same field get the same
verdict: fractions of pixels, a focus measure on the field reduced to QC_WIDTH pixels across
(a fixed share of the field of view), and the W/P shift as a fraction of the field width.  The
fractions look at a strided sample of the pixels (the valid fraction comes exactly from the
field's histogram when it is given), so QC costs a fraction of the spectrum itself.

Policy: a field that fails any check is reported with its reasons and left out of the slide
spectrum (the spectrum is flagged ``fields_excluded``); when no field passes, that is an error.
A failed field is never silently used.  :class:`SlideQC` is the one implementation of "slide
spectrum with QC": ``compute_slide_spectrum``, the device pipeline and the benchmarks use it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal, cast

import cv2
import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from firmware_bridge.validation import first_error
from inference.exceptions import SpectrumInputError
from inference.result import Measure, measure
from inference.spectrum.backends import SpectrumBackend, open_backend
from inference.spectrum.params import RbhistParams, WdiffParams
from inference.spectrum.types import Histogram, Spectrum, finalize
from inference.spectrum.validate import U8, Mask, check_pair

log = logging.getLogger(__name__)

Params = WdiffParams | RbhistParams
F32 = npt.NDArray[np.float32]

SAMPLE_SIDE = 256  # the strided sample for the pixel fractions is at most this many px a side
QC_WIDTH = 512  # focus and registration look at the field reduced to this many pixels across
MIN_REGISTRATION_SIDE = 8  # smaller fields cannot be registered and count as misregistered
FOCUS_SIGMA_PX = 1.0  # pre-smoothing of the focus measure, in pixels of the QC image
# Registration runs on the QC images halved to REGISTRATION_WIDTH: 5x cheaper than at QC_WIDTH,
# and phase correlation still resolves about 0.05 px there (0.0002 of the width).
REGISTRATION_WIDTH = QC_WIDTH // 2
# A shift under 0.2 px of the registration image is below what phase correlation tells apart
# reliably, so on narrow fields the shift limit never goes below it (at REGISTRATION_WIDTH it is
# 0.00078 of the width, just under the default limit).
SHIFT_PRECISION_PX = 0.2


class QCThresholds(BaseModel):
    """Limits of the per-field checks; a field outside any of them is rejected."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, frozen=True)

    min_valid_fraction: float = Field(
        0.25, ge=0.0, le=1.0, description="least fraction of pixels passing the validity rule"
    )
    dark_level: int = Field(
        64,
        ge=0,
        le=510,
        description="a pixel is dark when R+B < dark_level in W or P (above the spectrum's "
        "t_low: an underexposed field passes t_low, but its spectrum is mostly noise)",
    )
    max_dark_fraction: float = Field(
        0.5, ge=0.0, le=1.0, description="most fraction of dark pixels"
    )
    max_saturated_fraction: float = Field(
        0.1, ge=0.0, le=1.0, description="most fraction of pixels with a channel >= t_sat"
    )
    min_focus: float = Field(
        0.004,
        ge=0.0,
        description="least focus: var(Laplacian of the smoothed grey W) / var(grey W), on W "
        f"reduced to {QC_WIDTH} px across (narrower fields as they are)",
    )
    max_shift_fraction: float = Field(
        0.0008,
        ge=0.0,
        description="largest W/P shift as a fraction of the field width (0.0008: 0.5 µm on a "
        "640 µm field of view, 2 px at 2448 px across)",
    )
    min_registration_response: float = Field(
        0.1, ge=0.0, le=2.0, description="least phase-correlation peak between W and P"
    )


def qc_thresholds_from_json(d: dict[str, Any] | None) -> QCThresholds:
    """Validate thresholds from configuration; the error names the offending key."""
    try:
        return QCThresholds.model_validate(dict(d or {}))
    except ValidationError as exc:
        raise SpectrumInputError(f"bad QC threshold {first_error(exc, 'thresholds')}") from exc


Verdict = Literal["ok", "reject"]


@dataclass(frozen=True)
class FieldQuality:
    """The quality of one field and the verdict drawn from it."""

    index: int | None
    valid_fraction: float
    saturated_fraction: float
    dark_fraction: float
    focus: float
    shift_px: float
    shift_fraction: float
    registration_response: float
    verdict: Verdict
    reasons: tuple[str, ...]
    checks: tuple[Measure, ...] = ()  # the measure and limit behind each failed check

    @property
    def ok(self) -> bool:
        """True when the field may be used."""
        return self.verdict == "ok"

    def to_json(self) -> dict[str, Any]:
        """JSON object of one field (``fields`` in ``omis spectrum --json`` and results)."""
        return {
            "index": self.index,
            "valid_fraction": self.valid_fraction,
            "saturated_fraction": self.saturated_fraction,
            "dark_fraction": self.dark_fraction,
            "focus": self.focus,
            "shift_px": self.shift_px,
            "shift_fraction": self.shift_fraction,
            "registration_response": self.registration_response,
            "verdict": self.verdict,
            "reasons": list(self.reasons),
            "checks": [c.model_dump(mode="json") for c in self.checks],
        }


class NoUsableFieldError(SpectrumInputError):
    """No field of a slide passed quality control: nothing to classify.

    Carries every field's verdict (and, from the pipeline, the stage timings), so the appliance
    can still publish a result for the slide (flagged for review) instead of losing it.
    """

    def __init__(
        self,
        message: str,
        fields: list[FieldQuality],
        timings_ms: dict[str, float] | None = None,
    ) -> None:
        super().__init__(message)
        self.fields = fields
        self.timings_ms = dict(timings_ms or {})


def _sample(img: U8) -> U8:
    """A regular strided sample of at most SAMPLE_SIDE px a side (a view, no copy)."""
    sy = max(1, -(-img.shape[0] // SAMPLE_SIDE))
    sx = max(1, -(-img.shape[1] // SAMPLE_SIDE))
    return img[::sy, ::sx]


def _fractions(w: U8, p: U8, params: Params, dark_level: int) -> tuple[float, float, float]:
    """(valid, dark, saturated) fractions on the strided sample.

    Valid follows the spectrum's rule exactly; dark uses the QC's own ``dark_level``.
    """
    sw, sp = _sample(w), _sample(p)
    s_w = np.add(sw[..., 0], sw[..., 2], dtype=np.int32)
    s_p = np.add(sp[..., 0], sp[..., 2], dtype=np.int32)
    low = (s_w < params.t_low) | (s_p < params.t_low)
    dark = (s_w < dark_level) | (s_p < dark_level)
    # two elementwise maxima are much faster than a reduction over the channel axis
    sat = np.maximum(np.maximum(sw[..., 0], sw[..., 1]), sw[..., 2]) >= params.t_sat
    sat |= np.maximum(np.maximum(sp[..., 0], sp[..., 1]), sp[..., 2]) >= params.t_sat
    n = float(dark.size)
    valid = float(np.count_nonzero(~(low | sat))) / n
    return valid, float(np.count_nonzero(dark)) / n, float(np.count_nonzero(sat)) / n


def qc_grey(img: U8) -> U8:
    """Grey ``img`` reduced to QC_WIDTH pixels across (a narrower image as it is).

    A fixed number of pixels across the field is a fixed physical scale for a given field of
    view, whatever the sensor.  The reduction is one integer-factor area average (OpenCV's fast
    path; it also averages away pixel noise), then a bilinear resize by the remaining factor
    below 2 (OpenCV's area resize by a non-integer factor costs 20x more).
    """
    grey = cast(U8, cv2.cvtColor(np.ascontiguousarray(img), cv2.COLOR_RGB2GRAY))
    h, w = grey.shape
    k = w // QC_WIDTH
    if k >= 2 and h >= k:
        grey = grey[: h - h % k, : w - w % k]
        grey = cast(U8, cv2.resize(grey, (w // k, h // k), interpolation=cv2.INTER_AREA))
    if grey.shape[1] > QC_WIDTH:
        height = max(1, round(grey.shape[0] * QC_WIDTH / grey.shape[1]))
        grey = cast(U8, cv2.resize(grey, (QC_WIDTH, height), interpolation=cv2.INTER_LINEAR))
    return grey


def _focus(grey_u8: U8) -> float:
    """var(Laplacian of the slightly smoothed image) / var(image); 0 for a featureless one.

    Dividing by the grey variance makes it independent of exposure and stain contrast: it is
    the share of fine spatial detail, which defocus removes.
    """
    grey = grey_u8.astype(np.float32)
    variance = float(grey.var())
    if variance < 1.0:  # under one grey level of structure: nothing to focus on
        return 0.0
    smooth = cv2.GaussianBlur(grey, (0, 0), FOCUS_SIGMA_PX)
    lap = cv2.Laplacian(smooth, cv2.CV_32F, ksize=1, borderType=cv2.BORDER_REFLECT)
    return float(lap.var()) / variance


def _even_dft_side(n: int) -> int:
    """The largest even n' <= n that the DFT handles without padding.

    cv2.phaseCorrelate pads to cv2.getOptimalDFTSize; when that size is odd its peak is off by
    half a pixel (an OpenCV quirk), so both sides are cropped to an even, DFT-friendly size.
    """
    m = n - n % 2
    while m > 2 and cv2.getOptimalDFTSize(m) != m:
        m -= 2
    return m


def _halved(grey: U8) -> F32:
    """``grey`` halved (area average) while it stays at least REGISTRATION_WIDTH across."""
    while grey.shape[1] // 2 >= REGISTRATION_WIDTH and grey.shape[0] >= 2:
        half = (grey.shape[1] // 2, grey.shape[0] // 2)
        grey = cast(U8, cv2.resize(grey, half, interpolation=cv2.INTER_AREA))
    return grey.astype(np.float32)


def _register(grey_w: U8, grey_p: U8) -> tuple[float, float, int]:
    """(shift in pixels of the registration image, phase-correlation response, its width) of
    two QC images, after :func:`_halved`."""
    gw, gp = _halved(grey_w), _halved(grey_p)
    unmeasurable = (float(max(gw.shape)), 0.0, gw.shape[1])  # a shift the size of the field
    if min(gw.shape) < MIN_REGISTRATION_SIDE:
        return unmeasurable  # too small to correlate: registration cannot be confirmed
    h, w = (_even_dft_side(n) for n in gw.shape)
    y0, x0 = (gw.shape[0] - h) // 2, (gw.shape[1] - w) // 2
    gw, gp = gw[y0 : y0 + h, x0 : x0 + w], gp[y0 : y0 + h, x0 : x0 + w]
    # P is darker and differently contrasted than W; zero mean and unit variance make the
    # correlation compare structure, not brightness
    a = (gw - gw.mean()) / max(float(gw.std()), 1e-6)
    b = (gp - gp.mean()) / max(float(gp.std()), 1e-6)
    window = cv2.createHanningWindow((w, h), cv2.CV_32F)
    (dx, dy), response = cv2.phaseCorrelate(a, b, window)
    shift = float(np.hypot(dx, dy))
    if not (np.isfinite(response) and np.isfinite(shift)):
        return unmeasurable  # no usable correlation peak (JSON has no inf)
    return shift, float(response), unmeasurable[2]


def registration(w: U8, p: U8) -> tuple[float, float]:
    """(shift in full-resolution px, phase-correlation response) between W and P."""
    w, p, _ = check_pair(w, p)
    shift, response, width = _register(qc_grey(w), qc_grey(p))
    return shift * w.shape[1] / width, response


def _checks(q: dict[str, float], t: QCThresholds, reg_width: int) -> tuple[Measure, ...]:
    """Every failed check as a :class:`Measure` (the QC measure against its threshold)."""
    max_shift = max(t.max_shift_fraction, SHIFT_PRECISION_PX / reg_width)
    table: tuple[tuple[str, str, Literal["<", ">"], float], ...] = (
        ("dark", "dark_fraction", ">", t.max_dark_fraction),
        ("saturated", "saturated_fraction", ">", t.max_saturated_fraction),
        ("low_valid_fraction", "valid_fraction", "<", t.min_valid_fraction),
        ("out_of_focus", "focus", "<", t.min_focus),
        ("misregistered", "shift_fraction", ">", max_shift),
        ("misregistered", "registration_response", "<", t.min_registration_response),
    )
    return tuple(
        measure(code, name, q[name], op, limit)
        for code, name, op, limit in table
        if (q[name] > limit if op == ">" else q[name] < limit)
    )


def assess_field(
    w: U8,
    p: U8,
    params: Params,
    thresholds: QCThresholds | None = None,
    *,
    index: int | None = None,
    histogram: Histogram | None = None,
) -> FieldQuality:
    """Quality of one W/P field pair.

    With ``histogram`` (this field's spectrum histogram) the valid fraction is the exact one of
    the spectrum; without, it is measured on a strided sample of the field.
    """
    t = thresholds or QCThresholds()
    w, p, _ = check_pair(w, p)
    valid, dark, sat = _fractions(w, p, params, t.dark_level)
    if histogram is not None and histogram.total_pixels > 0:
        valid = histogram.valid_pixels / histogram.total_pixels
    gw = qc_grey(w)
    shift, response, reg_width = _register(gw, qc_grey(p))
    q = {
        "valid_fraction": valid,
        "dark_fraction": dark,
        "saturated_fraction": sat,
        "focus": _focus(gw),
        "shift_px": shift * w.shape[1] / reg_width,
        "shift_fraction": shift / reg_width,
        "registration_response": response,
    }
    checks = _checks(q, t, reg_width)
    reasons = tuple(dict.fromkeys(c.code for c in checks))  # codes in order, once each
    verdict: Verdict = "reject" if reasons else "ok"
    return FieldQuality(index=index, verdict=verdict, reasons=reasons, checks=checks, **q)


@dataclass(frozen=True)
class SlideSpectrum:
    """The slide spectrum over the fields that passed QC, and the quality of every field."""

    spectrum: Spectrum
    fields: tuple[FieldQuality, ...]

    @property
    def used(self) -> tuple[int, ...]:
        """Indices of the fields that went into the spectrum."""
        return tuple(i for i, f in enumerate(self.fields) if f.ok)

    def to_json(self) -> dict[str, Any]:
        """``Spectrum.to_json()`` plus ``fields`` (QC per field) and ``fields_used``."""
        return self.spectrum.to_json()


class SlideQC:
    """A slide's spectrum with QC, field by field: the one implementation of the policy.

    ``add`` judges a field whose histogram the caller computed and sums the histogram only when
    the field passes; ``finish`` turns the sum into the slide spectrum.
    """

    def __init__(self, params: Params, thresholds: QCThresholds | None = None) -> None:
        self.params = params
        self.thresholds = thresholds or QCThresholds()
        self.total = Histogram.empty(params)
        self.fields: list[FieldQuality] = []

    def add(self, w: U8, p: U8, histogram: Histogram, index: int | None = None) -> FieldQuality:
        """Judge one field (``index`` defaults to its position) and sum it if it passes."""
        i = len(self.fields) if index is None else index
        q = assess_field(w, p, self.params, self.thresholds, index=i, histogram=histogram)
        if q.ok:
            self.total = self.total + histogram
        else:
            log.debug("field %d rejected by quality control: %s", i, ", ".join(q.reasons))
        self.fields.append(q)
        return q

    def finish(self, backend_name: str) -> SlideSpectrum:
        """The slide spectrum; :class:`NoUsableFieldError` when no field passed."""
        if not self.fields:
            raise SpectrumInputError("no fields given")
        used = [q for q in self.fields if q.ok]
        if not used:
            detail = "; ".join(f"field {q.index}: {', '.join(q.reasons)}" for q in self.fields)
            raise NoUsableFieldError(f"no field passed quality control ({detail})", self.fields)
        spectrum = finalize(self.total, self.params, backend_name)
        excluded = ("fields_excluded",) if len(used) < len(self.fields) else ()
        extra = {
            "fields": [q.to_json() for q in self.fields],
            "fields_used": [q.index for q in used],
            "qc_thresholds": self.thresholds.model_dump(),
        }
        spectrum = replace(spectrum, flags=spectrum.flags + excluded, extra=extra)
        return SlideSpectrum(spectrum, tuple(self.fields))


def compute_slide_spectrum(
    fields: Sequence[tuple[U8, U8]],
    params: Params,
    backend: str | SpectrumBackend = "auto",
    thresholds: QCThresholds | None = None,
    masks: Sequence[Mask | None] | None = None,
) -> SlideSpectrum:
    """Spectrum of a slide over the fields that pass QC; every field's quality is reported.

    Rejected fields are left out and flag the spectrum ``fields_excluded``; if no field passes,
    :class:`NoUsableFieldError` names each field's reasons.
    """
    if not fields:
        raise SpectrumInputError("no fields given")
    if masks is not None and len(masks) != len(fields):
        raise SpectrumInputError(f"{len(masks)} masks for {len(fields)} fields")
    slide = SlideQC(params, thresholds)
    opened = open_backend(backend) if isinstance(backend, str) else backend
    try:
        for i, (w, p) in enumerate(fields):
            try:
                h = opened.histogram(w, p, params, None if masks is None else masks[i])
            except SpectrumInputError as exc:
                raise SpectrumInputError(f"field {i}: {exc}") from exc
            slide.add(w, p, h, i)
    finally:
        if isinstance(backend, str):
            opened.close()
    return slide.finish(opened.name)
