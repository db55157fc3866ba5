"""Finite or failed: checks applied to every value where it is produced, pixels to decision.

Each check raises an :class:`~inference.exceptions.InvalidValueError` subclass naming the stage
(``spectrum``, ``render``, ``preprocess``, ``infer``), so a slide with an unusable value ends
``failed`` with that stage and never gets a label.  Probabilities must be finite, within [0, 1]
and sum to 1 within :data:`PROBABILITY_SUM_TOLERANCE` per row.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from inference.exceptions import InvalidValueError, NonFiniteError, ProbabilityError

#: Largest accepted ``|sum(p) - 1|`` of one row of model outputs.  Softmax in FP32 is exact to
#: ~1e-7; an FP16 engine rounds each probability to 11 significant bits (≤ 5e-4 in total for a
#: few classes), so 5e-3 accepts every honest softmax and refuses logits or scores.
PROBABILITY_SUM_TOLERANCE = 5e-3


def check_finite(stage: str, values: npt.ArrayLike, what: str) -> None:
    """Raise :class:`NonFiniteError` if ``values`` holds NaN or infinity."""
    arr = np.asarray(values)
    if arr.dtype.kind not in "fc":
        return  # integers and booleans are finite by construction
    bad = ~np.isfinite(arr)
    if bad.any():
        kind = "NaN" if bool(np.isnan(arr).any()) else "infinity"
        first = tuple(int(i) for i in np.argwhere(bad)[0])
        raise NonFiniteError(
            stage, f"{what} holds {int(bad.sum())} non-finite value(s) ({kind}), first at {first}"
        )


def check_probabilities(stage: str, probs: npt.ArrayLike, n_classes: int) -> None:
    """Raise unless ``probs`` is an N×K array of finite probabilities, rows summing to 1."""
    arr = np.asarray(probs)
    if arr.ndim != 2 or arr.shape[1] != n_classes or arr.shape[0] == 0:
        raise ProbabilityError(stage, f"expected N×{n_classes} probabilities, got {arr.shape}")
    check_finite(stage, arr, "model output")
    low, high = float(arr.min()), float(arr.max())
    if low < 0.0 or high > 1.0:
        raise ProbabilityError(stage, f"probabilities outside [0, 1] (min {low:g}, max {high:g})")
    sums = arr.astype(np.float64).sum(axis=1)
    worst = float(np.max(np.abs(sums - 1.0)))
    if worst > PROBABILITY_SUM_TOLERANCE:
        raise ProbabilityError(
            stage,
            f"probabilities sum to {float(sums[np.argmax(np.abs(sums - 1.0))]):.6g}, not 1 "
            f"(tolerance {PROBABILITY_SUM_TOLERANCE:g})",
        )


def check_image(stage: str, image: npt.NDArray[np.generic], shape: tuple[int, ...]) -> None:
    """Raise :class:`InvalidValueError` unless ``image`` is uint8 of exactly ``shape``."""
    if image.dtype != np.uint8 or image.shape != shape:
        raise InvalidValueError(
            stage, f"expected a uint8 image of shape {shape}, got {image.dtype} {image.shape}"
        )
