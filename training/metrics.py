"""Classification metrics with Wilson intervals, ROC AUC, operating point and calibration.

Sensitivity and specificity are about risk: "positive" means a high-risk class (IV, V), and a
slide is called positive when its probability of high risk (the sum over the high-risk classes)
reaches the decision threshold.  Accuracy and the confusion matrix are over the task's classes
(for ``pap4`` the predicted class is the most probable one).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from statistics import NormalDist
from typing import Any

import numpy as np
import numpy.typing as npt
from scipy.stats import rankdata

F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]
B = npt.NDArray[np.bool_]

CALIBRATION_BINS = 10


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion (as statsmodels' ``method="wilson"``)."""
    if n <= 0:
        return (0.0, 1.0)
    z = NormalDist().inv_cdf(1.0 - (1.0 - confidence) / 2.0)
    p = successes / n
    z2 = z * z
    denom = 1.0 + z2 / n
    centre = (p + z2 / (2.0 * n)) / denom
    half = z * math.sqrt(p * (1.0 - p) / n + z2 / (4.0 * n * n)) / denom
    # rounding can put a bound a hair past the estimate (k = 0 or k = n): it always contains it
    return (min(p, max(0.0, centre - half)), max(p, min(1.0, centre + half)))


def proportion(successes: int, n: int) -> dict[str, Any]:
    """``{"value", "ci95", "successes", "n"}``; value and interval are null when n is 0."""
    if n == 0:
        return {"value": None, "ci95": None, "successes": 0, "n": 0}
    lo, hi = wilson_interval(successes, n)
    return {"value": successes / n, "ci95": [lo, hi], "successes": int(successes), "n": int(n)}


def roc_auc(positive: B, score: F64) -> float | None:
    """Area under the ROC curve (Mann-Whitney, ties count half); None with one class only."""
    pos = np.asarray(positive, dtype=bool)
    n_pos = int(pos.sum())
    n_neg = pos.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    ranks = rankdata(np.asarray(score, dtype=np.float64))
    u = float(ranks[pos].sum()) - n_pos * (n_pos + 1) / 2.0
    return u / (n_pos * n_neg)


def roc_points(positive: B, score: F64) -> tuple[F64, F64]:
    """(false positive rate, true positive rate) at every distinct threshold, from (0,0)."""
    pos = np.asarray(positive, dtype=bool)
    s = np.asarray(score, dtype=np.float64)
    thresholds = np.unique(s)[::-1]
    n_pos, n_neg = max(int(pos.sum()), 1), max(int((~pos).sum()), 1)
    tpr = [0.0] + [float((pos & (s >= t)).sum()) / n_pos for t in thresholds]
    fpr = [0.0] + [float((~pos & (s >= t)).sum()) / n_neg for t in thresholds]
    return np.array(fpr), np.array(tpr)


def threshold_at_sensitivity(positive: B, score: F64, target: float) -> dict[str, Any]:
    """The highest threshold whose sensitivity reaches ``target``, with its operating point."""
    pos = np.asarray(positive, dtype=bool)
    s = np.asarray(score, dtype=np.float64)
    out: dict[str, Any] = {
        "target": target,
        "threshold": None,
        "sensitivity": None,
        "specificity": None,
    }
    if not pos.any():
        return out
    for t in np.unique(s)[::-1]:
        called = s >= t
        sens = float((called & pos).sum()) / float(pos.sum())
        if sens >= target:
            neg = ~pos
            spec = float((~called & neg).sum()) / float(neg.sum()) if neg.any() else None
            out.update(threshold=float(t), sensitivity=sens, specificity=spec)
            break
    return out


def calibration(positive: B, score: F64, bins: int = CALIBRATION_BINS) -> dict[str, Any]:
    """Brier score, equal-width reliability bins and the expected calibration error (ECE)."""
    y = np.asarray(positive, dtype=np.float64)
    p = np.asarray(score, dtype=np.float64)
    edges = np.linspace(0.0, 1.0, bins + 1)
    idx = np.clip(np.digitize(p, edges[1:-1], right=False), 0, bins - 1)
    table = []
    ece = 0.0
    for b in range(bins):
        sel = idx == b
        n = int(sel.sum())
        row: dict[str, Any] = {
            "lo": float(edges[b]),
            "hi": float(edges[b + 1]),
            "count": n,
            "mean_predicted": None,
            "observed": None,
        }
        if n:
            mp, ob = float(p[sel].mean()), float(y[sel].mean())
            row.update(mean_predicted=mp, observed=ob)
            ece += n / y.size * abs(ob - mp)
        table.append(row)
    brier = float(np.mean((p - y) ** 2)) if y.size else None
    return {"brier": brier, "ece": ece if y.size else None, "bins": table}


def confusion_matrix(y_true: I64, y_pred: I64, num_classes: int) -> list[list[int]]:
    """Rows: true class, columns: predicted class (as in the study's Figure 2)."""
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(cm, (np.asarray(y_true), np.asarray(y_pred)), 1)
    return [[int(v) for v in row] for row in cm]


def high_risk_probability(probs: F64, high_classes: Sequence[int]) -> F64:
    """Probability of high risk: the sum over the high-risk classes."""
    out: F64 = np.asarray(probs, dtype=np.float64)[:, list(high_classes)].sum(axis=1)
    return out


def predict_classes(probs: F64, high_classes: Sequence[int], threshold: float | F64) -> I64:
    """Binary tasks: high when p(high) >= threshold; otherwise the most probable class."""
    probs = np.asarray(probs, dtype=np.float64)
    if probs.shape[1] == 2:
        high = high_risk_probability(probs, high_classes) >= threshold
        low_class = 1 - int(high_classes[0])
        called: I64 = np.where(high, int(high_classes[0]), low_class).astype(np.int64)
        return called
    top: I64 = np.argmax(probs, axis=1).astype(np.int64)
    return top


def classification_metrics(
    y_true: I64,
    probs: F64,
    high_classes: Sequence[int],
    *,
    threshold: float | F64 = 0.5,
    target_sensitivity: float = 0.9,
) -> dict[str, Any]:
    """All metrics of one set of predictions (a fold, or the pooled out-of-fold predictions).

    ``threshold`` is one decision threshold or one per slide (pooled folds, each with the
    threshold chosen on its own validation data; ``threshold`` is then null in the result).
    ``threshold_at_target_sensitivity`` is picked on these very predictions: it describes the
    curve and is never shipped.
    """
    y_true = np.asarray(y_true, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    k = probs.shape[1]
    y_pred = predict_classes(probs, high_classes, threshold)
    p_high = high_risk_probability(probs, high_classes)
    positive = np.isin(y_true, list(high_classes))
    called = p_high >= threshold
    tp = int((positive & called).sum())
    tn = int((~positive & ~called).sum())
    return {
        "n": int(y_true.size),
        "threshold": float(threshold) if np.ndim(threshold) == 0 else None,
        "confusion_matrix": confusion_matrix(y_true, y_pred, k),
        "sensitivity": proportion(tp, int(positive.sum())),
        "specificity": proportion(tn, int((~positive).sum())),
        "accuracy": proportion(int((y_pred == y_true).sum()), int(y_true.size)),
        "roc_auc": roc_auc(positive, p_high),
        "threshold_at_target_sensitivity": threshold_at_sensitivity(
            positive, p_high, target_sensitivity
        ),
        "calibration": calibration(positive, p_high),
    }


def referral_figures(
    positive: B, p_high: F64, low: float | F64, high: float | F64
) -> dict[str, Any]:
    """What the device would do with an abstain band ``[low, high]`` (per slide or one).

    A slide inside the band is referred to a person; outside it the device decides (high above
    the band, low below).  ``referral_rate`` is the share referred; ``*_decided`` are figures
    on the decided slides only; ``*_with_review`` count each referral as a correct human review
    (the best a referral can do: they bound what the workflow can reach).
    """
    pos = np.asarray(positive, dtype=bool)
    p = np.asarray(p_high, dtype=np.float64)
    lo = np.broadcast_to(np.asarray(low, dtype=np.float64), p.shape)
    hi = np.broadcast_to(np.asarray(high, dtype=np.float64), p.shape)
    referred = (p >= lo) & (p <= hi)
    decided = ~referred
    called_high = decided & (p > hi)
    called_low = decided & (p < lo)
    return {
        "referral_rate": proportion(int(referred.sum()), int(p.size)),
        "sensitivity_decided": proportion(
            int((pos & called_high).sum()), int((pos & decided).sum())
        ),
        "specificity_decided": proportion(
            int((~pos & called_low).sum()), int((~pos & decided).sum())
        ),
        "sensitivity_with_review": proportion(int((pos & ~called_low).sum()), int(pos.sum())),
        "specificity_with_review": proportion(int((~pos & ~called_high).sum()), int((~pos).sum())),
    }
