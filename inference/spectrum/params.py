"""Versioned spectrum algorithms and their parameters (see ``docs/spectrum.md``).

A bundle records the algorithm name and every parameter, so the device computes exactly what
its model was trained on.  A new formula is a new algorithm name, never an edit of an old one.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, model_validator

from firmware_bridge.validation import first_error
from inference.exceptions import SpectrumInputError

RBHIST_BINS = 511  # d = R - B over [-255, 255]


class _Common(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, frozen=True)

    lambda_r_nm: float = Field(610.0, description="effective wavelength of the red channel (nm)")
    lambda_b_nm: float = Field(465.0, description="effective wavelength of the blue channel (nm)")
    # t_low >= 1: a pixel with R+B == 0 in both images has den == 0, and its bin is undefined.
    t_low: int = Field(8, ge=1, le=510, description="a pixel needs R+B >= t_low in both images")
    t_sat: int = Field(
        250, ge=1, le=256, description="a pixel is dropped if any channel >= t_sat in either image"
    )
    n_smooth: int = Field(8, ge=0, le=30, description="binomial smoothing kernel of 2n+1 taps")

    @model_validator(mode="after")
    def _span_positive(self) -> _Common:
        if self.lambda_r_nm <= self.lambda_b_nm:
            raise ValueError("lambda_r_nm must be greater than lambda_b_nm")
        return self

    @property
    def span_nm(self) -> float:
        """D = lambda_r_nm - lambda_b_nm, the half-width of the axis."""
        return self.lambda_r_nm - self.lambda_b_nm


class WdiffParams(_Common):
    """Parameters of ``omis-wdiff-v1``, the default algorithm."""

    algorithm: Literal["omis-wdiff-v1"] = "omis-wdiff-v1"
    bins: int = Field(290, ge=2, le=4000, description="bins over [-D, D]")

    @property
    def n_bins(self) -> int:
        """Length of the spectrum."""
        return self.bins


class RbhistParams(_Common):
    """Parameters of ``omis-rbhist-v1``: histograms of R - B, diffuse minus polarized."""

    algorithm: Literal["omis-rbhist-v1"] = "omis-rbhist-v1"

    @property
    def n_bins(self) -> int:
        """Length of the spectrum (fixed: d = R - B over [-255, 255])."""
        return RBHIST_BINS


SpectrumParams = Annotated[WdiffParams | RbhistParams, Field(discriminator="algorithm")]
ALGORITHMS = ("omis-wdiff-v1", "omis-rbhist-v1")
_ADAPTER: TypeAdapter[WdiffParams | RbhistParams] = TypeAdapter(SpectrumParams)


def parse_params(
    data: dict[str, Any] | None = None, algorithm: str | None = None
) -> WdiffParams | RbhistParams:
    """Validate a parameter dict (as stored in a bundle or given with ``--params``).

    ``algorithm`` fills in the name when ``data`` lacks it; a conflicting name is an error.
    """
    merged: dict[str, Any] = dict(data or {})
    if algorithm is not None:
        if "algorithm" in merged and merged["algorithm"] != algorithm:
            raise SpectrumInputError(
                f"algorithm {algorithm!r} conflicts with params algorithm {merged['algorithm']!r}"
            )
        merged["algorithm"] = algorithm
    merged.setdefault("algorithm", "omis-wdiff-v1")
    if merged["algorithm"] not in ALGORITHMS:
        raise SpectrumInputError(
            f"unknown spectrum algorithm {merged['algorithm']!r}; known: {', '.join(ALGORITHMS)}"
        )
    try:
        return _ADAPTER.validate_python(merged)
    except ValidationError as exc:
        detail = first_error(exc, "params", skip=1)
        raise SpectrumInputError(f"bad spectrum parameter {detail}") from exc
