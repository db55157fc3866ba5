"""Input checks shared by every spectrum backend: bad input is an error, never a guess."""

from __future__ import annotations

from typing import cast

import numpy as np
import numpy.typing as npt

from inference.exceptions import SpectrumInputError

U8 = npt.NDArray[np.uint8]
Mask = npt.NDArray[np.bool_]


def check_pair(w: object, p: object, mask: object | None = None) -> tuple[U8, U8, Mask | None]:
    """Check one W/P pair (and optional mask); return them typed, or raise SpectrumInputError."""
    for name, img in (("W (diffuse)", w), ("P (polarized)", p)):
        if not isinstance(img, np.ndarray):
            raise SpectrumInputError(f"{name}: expected a numpy array, got {type(img).__name__}")
        if img.dtype != np.uint8:
            raise SpectrumInputError(f"{name}: expected uint8 data, got {img.dtype}")
        if img.ndim != 3 or img.shape[2] != 3:
            raise SpectrumInputError(f"{name}: expected an H×W×3 RGB image, got shape {img.shape}")
        if img.shape[0] == 0 or img.shape[1] == 0:
            raise SpectrumInputError(f"{name}: the image is empty")
    w_img, p_img = cast(U8, w), cast(U8, p)  # checked above
    if w_img.shape != p_img.shape:
        raise SpectrumInputError(f"W and P differ in shape: {w_img.shape} vs {p_img.shape}")
    m: Mask | None = None
    if mask is not None:
        if not isinstance(mask, np.ndarray) or mask.dtype != np.bool_:
            raise SpectrumInputError("mask: expected a boolean numpy array")
        if mask.shape != w_img.shape[:2]:
            raise SpectrumInputError(
                f"mask shape {mask.shape} does not match image {w_img.shape[:2]}"
            )
        if not mask.any():
            raise SpectrumInputError("mask: the mask is empty (no pixel selected)")
        m = mask
    return w_img, p_img, m
