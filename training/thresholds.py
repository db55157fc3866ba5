"""Decision threshold, abstain band and temperature, chosen on validation data only.

For each cross-validation fold the network's predictions on that fold's inner validation
slides (patients held out of its training, never its test slides) give:

* the decision threshold: the highest threshold on p(high) whose sensitivity reaches the target
  (default 90 %);
* the abstain band: from the highest threshold still catching ``BAND_SENSITIVITY`` of the
  high-risk validation slides up to the lowest threshold at which ``BAND_SPECIFICITY`` of the
  low-risk ones fall below it, widened to contain the decision threshold.  Outside the band
  both kinds of error were rare on validation; inside it a person reviews the slide;
* optionally a softmax temperature minimising the validation negative log-likelihood.

The fold's thresholds score its test slides; the shipped model's come from all folds'
validation predictions pooled.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax

from inference.bundle import Thresholds
from training.metrics import threshold_at_sensitivity

F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]
B = npt.NDArray[np.bool_]

BAND_SENSITIVITY = 0.98
BAND_SPECIFICITY = 0.98


@dataclass(frozen=True)
class Choice:
    """Thresholds chosen on one set of validation predictions, or why none could be."""

    thresholds: Thresholds
    n_validation: int
    problem: str | None = None

    def to_json(self) -> dict[str, object]:
        """JSON object for the report."""
        return {
            **self.thresholds.model_dump(mode="json"),
            "n_validation": self.n_validation,
            "problem": self.problem,
        }


def _lowest_threshold_at_specificity(negative: B, score: F64, target: float) -> float | None:
    s = score[negative]
    if s.size == 0:
        return None
    for t in np.unique(score):  # ascending: the first t with enough negatives below it
        if float((s < t).sum()) / s.size >= target:
            return float(t)
    return float(np.nextafter(score.max(), np.inf))


def choose_thresholds(
    positive: B, p_high: F64, target_sensitivity: float, temperature: float = 1.0
) -> Choice:
    """Decision threshold and abstain band from validation predictions (see the module doc)."""
    pos = np.asarray(positive, dtype=bool)
    n = int(pos.size)
    if not pos.any() or pos.all():
        return Choice(
            Thresholds(target_sensitivity=target_sensitivity, temperature=temperature),
            n,
            "validation data hold one risk class only: defaults kept",
        )
    decision = float(threshold_at_sensitivity(pos, p_high, target_sensitivity)["threshold"])
    lo = float(threshold_at_sensitivity(pos, p_high, BAND_SENSITIVITY)["threshold"])
    hi = _lowest_threshold_at_specificity(~pos, p_high, BAND_SPECIFICITY)
    hi = decision if hi is None else hi
    th = Thresholds(
        decision=decision,
        abstain_low=min(lo, decision),
        abstain_high=min(1.0, max(hi, decision)),
        chosen_on="validation",
        target_sensitivity=target_sensitivity,
        temperature=temperature,
    )
    return Choice(th, n)


def fit_temperature(logits: F64, labels: I64) -> float:
    """The softmax temperature minimising the negative log-likelihood of ``labels``."""
    z = np.asarray(logits, dtype=np.float64)
    y = np.asarray(labels, dtype=np.int64)
    if y.size == 0:
        return 1.0

    def nll(log_t: float) -> float:
        return float(-log_softmax(z / math.exp(log_t), axis=1)[np.arange(y.size), y].mean())

    res = minimize_scalar(nll, bounds=(-3.0, 3.0), method="bounded")
    return float(math.exp(float(res.x)))


def softmax_t(logits: F64, temperature: float) -> F64:
    """Softmax of ``logits / temperature``."""
    out: F64 = np.exp(log_softmax(np.asarray(logits, dtype=np.float64) / temperature, axis=1))
    return out
