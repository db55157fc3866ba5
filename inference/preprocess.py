"""Spectrum (image) -> network input tensor: the one preprocessing for training and the device.

The normalisation comes from the bundle's ``input`` section; nothing here is guessed.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from inference.bundle import InputSpec
from inference.exceptions import SpectrumInputError
from inference.integrity import check_finite
from inference.render import RenderParams, render_spectrum

F32 = npt.NDArray[np.float32]


def to_tensor(images: Sequence[npt.NDArray[np.uint8]], spec: InputSpec) -> F32:
    """Stack RGB uint8 H×W×3 images into a float32 N×3×H×W tensor normalised as ``spec`` says."""
    if not images:
        raise SpectrumInputError("no images to preprocess")
    h, w = spec.height, spec.width
    for i, img in enumerate(images):
        if img.dtype != np.uint8 or img.shape != (h, w, 3):
            raise SpectrumInputError(
                f"image {i}: expected uint8 {(h, w, 3)} for this model, got {img.dtype} {img.shape}"
            )
    norm = spec.normalization
    batch = np.stack(images).astype(np.float32)
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):  # checked just below
        batch *= np.float32(norm.scale)
        batch -= np.asarray(norm.mean, dtype=np.float32)
        batch /= np.asarray(norm.std, dtype=np.float32)
    check_finite("preprocess", batch, "input tensor")
    return np.ascontiguousarray(batch.transpose(0, 3, 1, 2))


def spectrum_to_tensor(ys: Sequence[npt.NDArray[np.float64]], spec: InputSpec) -> F32:
    """Stack spectrum vectors into the float32 N×1×1×L input of a ``spectrum`` model."""
    if not ys:
        raise SpectrumInputError("no spectra to preprocess")
    length = spec.width
    for i, y in enumerate(ys):
        arr = np.asarray(y)
        if arr.ndim != 1 or arr.size != length:
            raise SpectrumInputError(
                f"spectrum {i}: expected {length} values for this model, got shape {arr.shape}"
            )
        if not np.all(np.isfinite(arr)):
            raise SpectrumInputError(f"spectrum {i}: non-finite values")
    batch = np.stack([np.asarray(y, dtype=np.float64) for y in ys]).astype(np.float32)
    batch *= np.float32(spec.normalization.scale)
    return np.ascontiguousarray(batch[:, None, None, :])


def model_input(
    x_nm: npt.NDArray[np.float64],
    y: npt.NDArray[np.float64],
    render: RenderParams,
    spec: InputSpec,
) -> F32:
    """The network input of one slide, as the bundle's ``input.representation`` says (1×…)."""
    if spec.representation == "spectrum":
        return spectrum_to_tensor([y], spec)
    return to_tensor([render_spectrum(x_nm, y, render)], spec)
