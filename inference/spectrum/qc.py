"""Per-field quality control, and the slide spectrum over the fields that pass it.

Checks (see ``docs/spectrum.md``): valid fraction under the spectrum's own validity rule, dark
and saturated fractions, a focus measure and a W/P registration check.  They look at a strided
sample of the pixels and at grey images halved a few times, so they cost a fraction of the
spectrum itself.

Policy: a field that fails any check is reported with its reasons and left out of the slide
spectrum (the spectrum is flagged ``fields_excluded``); when no field passes, that is an error.
A failed field is never silently used.
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
from inference.spectrum.backends import SpectrumBackend, open_backend
from inference.spectrum.params import RbhistParams, WdiffParams
from inference.spectrum.types import Histogram, Spectrum, finalize
from inference.spectrum.validate import U8, Mask, check_pair

log = logging.getLogger(__name__)

Params = WdiffParams | RbhistParams
F32 = npt.NDArray[np.float32]

SAMPLE_SIDE = 256  # the strided sample for the pixel fractions is at most this many px a side
SMALL_MIN_SIDE = 384  # focus and registration images are halved while their long side stays >= this
MIN_REGISTRATION_SIDE = 8  # smaller fields cannot be registered and count as misregistered
FOCUS_SIGMA_PX = 1.0  # pre-smoothing of the focus measure, in pixels of the halved image


class QCThresholds(BaseModel):
    """Limits of the per-field checks; a field outside any of them is rejected."""

    model_config = ConfigDict(extra="forbid", frozen=True)

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
        "halved to 384-767 px",
    )
    max_shift_px: float = Field(
        1.0, ge=0.0, description="largest W/P shift in full-resolution pixels"
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
    registration_response: float
    verdict: Verdict
    reasons: tuple[str, ...]

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
            "registration_response": self.registration_response,
            "verdict": self.verdict,
            "reasons": list(self.reasons),
        }


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


def _grey(img: U8) -> F32:
    grey = cv2.cvtColor(np.ascontiguousarray(img), cv2.COLOR_RGB2GRAY)
    return grey.astype(np.float32)


def _shrink(img: U8) -> U8:
    """Halve ``img`` while its long side stays >= SMALL_MIN_SIDE.

    Halving is OpenCV's fast INTER_AREA path (other factors are ~20x slower); it also averages
    away pixel noise, which would otherwise dominate the focus measure.  At >= 384 px the
    sub-pixel shift stays accurate to about 0.3 full-resolution pixels.
    """
    while max(img.shape[:2]) // 2 >= SMALL_MIN_SIDE:
        half = (img.shape[1] // 2, img.shape[0] // 2)
        img = cast(U8, cv2.resize(img, half, interpolation=cv2.INTER_AREA))
    return img


def _small_greys(w: U8, p: U8) -> tuple[F32, F32, float]:
    """Grey W and P after :func:`_shrink`, and the factor back to full-resolution pixels."""
    small_w, small_p = _shrink(w), _shrink(p)
    return _grey(small_w), _grey(small_p), w.shape[1] / small_w.shape[1]


def _focus(grey: F32) -> float:
    """var(Laplacian of the slightly smoothed image) / var(image); 0 for a featureless one.

    Dividing by the grey variance makes it independent of exposure and stain contrast: it is
    the share of fine spatial detail, which defocus removes.
    """
    variance = float(grey.var())
    if variance < 1.0:  # under one grey level of structure: nothing to focus on
        return 0.0
    smooth = cv2.GaussianBlur(grey, (0, 0), FOCUS_SIGMA_PX)
    lap = cv2.Laplacian(smooth, cv2.CV_32F, ksize=1, borderType=cv2.BORDER_REFLECT)
    return float(lap.var()) / variance


def _register(gw: F32, gp: F32, scale: float) -> tuple[float, float]:
    """(shift in full-resolution px, phase-correlation response) of the halved grey images."""
    unmeasurable = (float(max(gw.shape)) * scale, 0.0)  # a shift the size of the field
    if min(gw.shape) < MIN_REGISTRATION_SIDE:
        return unmeasurable  # too small to correlate: registration cannot be confirmed
    # P is darker and differently contrasted than W; zero mean and unit variance make the
    # correlation compare structure, not brightness
    a = (gw - gw.mean()) / max(float(gw.std()), 1e-6)
    b = (gp - gp.mean()) / max(float(gp.std()), 1e-6)
    window = cv2.createHanningWindow((a.shape[1], a.shape[0]), cv2.CV_32F)
    (dx, dy), response = cv2.phaseCorrelate(a, b, window)
    shift = float(np.hypot(dx, dy)) * scale
    if not (np.isfinite(response) and np.isfinite(shift)):
        return unmeasurable  # no usable correlation peak (JSON has no inf)
    return shift, float(response)


def focus_measure(w: U8) -> float:
    """The focus measure of a diffuse image (see :class:`QCThresholds.min_focus`)."""
    return _focus(_grey(_shrink(w)))


def registration(w: U8, p: U8) -> tuple[float, float]:
    """(shift in full-resolution px, phase-correlation response) between W and P."""
    w, p, _ = check_pair(w, p)
    gw, gp, scale = _small_greys(w, p)
    return _register(gw, gp, scale)


def _reasons(q: dict[str, float], t: QCThresholds) -> tuple[str, ...]:
    checks = (
        ("dark", q["dark_fraction"] > t.max_dark_fraction),
        ("saturated", q["saturated_fraction"] > t.max_saturated_fraction),
        ("low_valid_fraction", q["valid_fraction"] < t.min_valid_fraction),
        ("out_of_focus", q["focus"] < t.min_focus),
        (
            "misregistered",
            q["shift_px"] > t.max_shift_px
            or q["registration_response"] < t.min_registration_response,
        ),
    )
    return tuple(name for name, failed in checks if failed)


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
    gw, gp, scale = _small_greys(w, p)
    shift, response = _register(gw, gp, scale)
    q = {
        "valid_fraction": valid,
        "dark_fraction": dark,
        "saturated_fraction": sat,
        "focus": _focus(gw),
        "shift_px": shift,
        "registration_response": response,
    }
    reasons = _reasons(q, t)
    verdict: Verdict = "reject" if reasons else "ok"
    return FieldQuality(index=index, verdict=verdict, reasons=reasons, **q)


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


def _field_results(
    backend: SpectrumBackend,
    fields: Sequence[tuple[U8, U8]],
    params: Params,
    thresholds: QCThresholds,
    masks: Sequence[Mask | None] | None,
) -> list[tuple[Histogram, FieldQuality]]:
    out = []
    for i, (w, p) in enumerate(fields):
        mask = None if masks is None else masks[i]
        try:
            h = backend.histogram(w, p, params, mask)
        except SpectrumInputError as exc:
            raise SpectrumInputError(f"field {i}: {exc}") from exc
        q = assess_field(w, p, params, thresholds, index=i, histogram=h)
        if not q.ok:
            log.info("field %d rejected by quality control: %s", i, ", ".join(q.reasons))
        out.append((h, q))
    return out


def compute_slide_spectrum(
    fields: Sequence[tuple[U8, U8]],
    params: Params,
    backend: str | SpectrumBackend = "auto",
    thresholds: QCThresholds | None = None,
    masks: Sequence[Mask | None] | None = None,
) -> SlideSpectrum:
    """Spectrum of a slide over the fields that pass QC; every field's quality is reported.

    Rejected fields are left out and flag the spectrum ``fields_excluded``; if no field passes,
    :class:`SpectrumInputError` names each field's reasons.
    """
    if not fields:
        raise SpectrumInputError("no fields given")
    if masks is not None and len(masks) != len(fields):
        raise SpectrumInputError(f"{len(masks)} masks for {len(fields)} fields")
    t = thresholds or QCThresholds()
    opened = open_backend(backend) if isinstance(backend, str) else backend
    try:
        results = _field_results(opened, fields, params, t, masks)
    finally:
        if isinstance(backend, str):
            opened.close()
    qualities = tuple(q for _, q in results)
    used = [h for h, q in results if q.ok]
    if not used:
        detail = "; ".join(f"field {q.index}: {', '.join(q.reasons)}" for q in qualities)
        raise SpectrumInputError(f"no field passed quality control ({detail})")
    total = Histogram.empty(params)
    for h in used:
        total = total + h
    spectrum = finalize(total, params, opened.name)
    flags = spectrum.flags + (("fields_excluded",) if len(used) < len(results) else ())
    extra = {
        "fields": [q.to_json() for q in qualities],
        "fields_used": [q.index for q in qualities if q.ok],
        "qc_thresholds": t.model_dump(),
    }
    return SlideSpectrum(replace(spectrum, flags=flags, extra=extra), qualities)
