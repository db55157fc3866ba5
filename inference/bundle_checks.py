"""Strict checks of a bundle's manifest and arrays (used by :mod:`inference.bundle`).

A signature proves who wrote a manifest, not that it is right: everything here refuses, with
one line naming the key, what the device could not run or would run wrongly.  Strict JSON (no
``NaN``, no duplicate keys), strict scalar types (no ``"2"`` for 2, no ``true`` for 1), a
version that a JSON double holds exactly, spectrum and render sections this code can compute,
and golden arrays loaded without pickle and checked for dtype, shape and finiteness.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import numpy.typing as npt
from pydantic import Field, StrictFloat, ValidationError

from firmware_bridge.validation import first_error_parts
from inference.exceptions import BundleError, InferenceError

#: Versions are JSON numbers: above 2**53 a double no longer holds every integer exactly.
MAX_VERSION = 2**53
MAX_GOLDEN = 256  # golden inputs per bundle: enough to prove a backend, small enough to load
MAX_GOLDEN_FIELDS = 16
DEFAULT_TOLERANCE: dict[Literal["fp32", "fp16"], float] = {"fp32": 1e-4, "fp16": 2e-2}
#: The whole-path goldens: per field pair, spectrum integers, image, tensor, probabilities.
GOLDEN_PATH_ARRAYS = (
    "golden/path/histograms.npy",
    "golden/path/counts.npy",
    "golden/path/pixels.npy",
    "golden/path/images.npy",
    "golden/path/inputs.npy",
    "golden/path/outputs.npy",
)

# Strict scalar types: no "2" for 2, no true for 1, no NaN or infinity.
Finite = Annotated[StrictFloat, Field(allow_inf_nan=False)]
PositiveFinite = Annotated[StrictFloat, Field(gt=0.0, allow_inf_nan=False)]
Probability = Annotated[StrictFloat, Field(ge=0.0, le=1.0, allow_inf_nan=False)]


def golden_field_files(index: int) -> tuple[str, str]:
    """Bundle-relative names of golden field pair ``index``: (diffuse, polarized)."""
    return f"golden/fields/{index:03d}-diffuse.png", f"golden/fields/{index:03d}-polarized.png"


def golden_path_files(fields: int) -> list[str]:
    """Every whole-path golden file a manifest with ``fields`` golden pairs must list."""
    if fields == 0:
        return []
    pairs = [name for i in range(fields) for name in golden_field_files(i)]
    return [*pairs, *GOLDEN_PATH_ARRAYS]


def check_runnable(
    spectrum: dict[str, Any], render: dict[str, Any], representation: str, shape: tuple[int, ...]
) -> None:
    """The spectrum and render sections must describe something this code can compute for the
    model input (``representation`` and N×C×H×W ``shape``): an image model's input is the
    render size, a spectrum model's input length is the algorithm's number of bins; raises
    ``ValueError`` (a manifest validator)."""
    from inference.render import render_params_from_json
    from inference.spectrum import parse_params
    from inference.spectrum.types import axis_nm

    try:
        params = parse_params(spectrum)
        rp = render_params_from_json(render)
    except InferenceError as exc:
        raise ValueError(str(exc)) from exc
    h, w = shape[2], shape[3]
    if representation == "spectrum" and w != params.n_bins:
        raise ValueError(
            f"the model reads {w} spectrum values but the algorithm gives {params.n_bins} bins"
        )
    if representation == "image" and (rp.height, rp.width) != (h, w):
        raise ValueError(
            f"render size {rp.width}x{rp.height} does not match the model input {w}x{h}"
        )
    if rp.x_range_nm is not None:
        axis = axis_nm(params)
        lo, hi = rp.x_range_nm
        inside = int(np.count_nonzero((axis >= lo) & (axis <= hi)))
        if inside < 2:
            raise ValueError(
                f"render x_range_nm {rp.x_range_nm} holds {inside} point(s) of the spectrum "
                f"axis [{axis[0]:g}, {axis[-1]:g}] nm; need at least 2"
            )


def first_error(exc: ValidationError) -> str:
    """``key.path: message (got value)`` of the first error: the shared one-line form
    (:func:`firmware_bridge.validation.first_error_parts`) plus the offending scalar."""
    where, msg = first_error_parts(exc, root="manifest")
    first = exc.errors()[0]
    got = first.get("input")
    if first["loc"] and isinstance(got, str | int | float | bool):
        msg += f" (got {got!r})"
    return f"{where}: {msg}"


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number (strict JSON: finite numbers only)")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [k for k, _ in pairs]
    dup = sorted({k for k in keys if keys.count(k) > 1})
    if dup:
        raise ValueError(f"duplicate key(s) {', '.join(map(repr, dup))}")
    return dict(pairs)


def strict_json(data: bytes) -> Any:
    """Parse UTF-8 JSON refusing ``NaN``/``Infinity`` and duplicate keys (``ValueError``)."""
    return json.loads(
        data.decode("utf-8"), parse_constant=_no_constant, object_pairs_hook=_unique_keys
    )


def load_array(
    root: Path, name: str, dtype: type[np.generic], shape: tuple[int | None, ...]
) -> npt.NDArray[Any]:
    """Load ``root/name`` (.npy, never pickle) and require ``dtype``, ``shape`` and finiteness.

    ``None`` in ``shape`` is the count of golden items: 1 to :data:`MAX_GOLDEN`.
    """
    try:
        arr = np.load(root / name, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise BundleError(f"{name}: not a readable .npy array ({exc})") from exc
    if not isinstance(arr, np.ndarray):
        raise BundleError(f"{name}: not a single .npy array")
    want = tuple("N" if s is None else s for s in shape)
    if arr.dtype != np.dtype(dtype) or arr.ndim != len(shape):
        raise BundleError(f"{name}: expected {np.dtype(dtype)} {want}, got {arr.dtype} {arr.shape}")
    for got, expect in zip(arr.shape, shape, strict=True):
        if (expect is None and not 1 <= got <= MAX_GOLDEN) or (expect not in (None, got)):
            raise BundleError(f"{name}: expected shape {want}, got {arr.shape}")
    if arr.dtype.kind == "f" and not bool(np.isfinite(arr).all()):
        raise BundleError(f"{name}: holds NaN or infinity")
    return arr
