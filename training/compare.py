"""Comparing models on the same folds: AUC intervals and paired tests, per class, per patient.

* AUC with its DeLong 95 % interval, and DeLong's paired test between two models scored on the
  same slides (DeLong, DeLong & Clarke-Pearson 1988, in Sun & Xu's 2014 fast form).
* McNemar's exact test of two models' correct/incorrect risk decisions at their own
  validation-chosen thresholds (statsmodels).
* Per-class sensitivity, specificity (Wilson) and F1 (seeded bootstrap interval), one class
  against the rest, predicted class = the most probable one.
* Per-patient aggregation: a patient's probability of high risk is the mean over their slides,
  the patient is positive when any slide is.
"""

from __future__ import annotations

from collections.abc import Sequence
from statistics import NormalDist
from typing import Any

import numpy as np
import numpy.typing as npt
from scipy.stats import rankdata
from statsmodels.stats.contingency_tables import mcnemar

from training.metrics import proportion, roc_auc

F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]
B = npt.NDArray[np.bool_]

BOOTSTRAP = 1000
_Z = NormalDist().inv_cdf(0.975)


def delong(positive: B, scores: Sequence[F64]) -> tuple[F64, F64]:
    """AUC of each score vector and their DeLong covariance matrix (k×k)."""
    pos = np.asarray(positive, dtype=bool)
    s = np.stack([np.asarray(v, dtype=np.float64) for v in scores])
    x, y = s[:, pos], s[:, ~pos]
    m, n = x.shape[1], y.shape[1]
    if m < 2 or n < 2:
        raise ValueError("DeLong needs at least two slides of each class")
    tx = np.stack([rankdata(r) for r in x])
    ty = np.stack([rankdata(r) for r in y])
    tz = np.stack([rankdata(r) for r in np.concatenate([x, y], axis=1)])
    aucs = tz[:, :m].sum(axis=1) / (m * n) - (m + 1.0) / (2.0 * n)
    v01 = (tz[:, :m] - tx) / n
    v10 = 1.0 - (tz[:, m:] - ty) / m
    cov = np.atleast_2d(np.cov(v01)) / m + np.atleast_2d(np.cov(v10)) / n
    return aucs, cov


def auc_with_interval(positive: B, score: F64) -> dict[str, Any]:
    """``{"value", "ci95", "method": "DeLong"}``; null values with fewer than 2 per class."""
    pos = np.asarray(positive, dtype=bool)
    if min(int(pos.sum()), int((~pos).sum())) < 2:
        return {"value": roc_auc(pos, score), "ci95": None, "method": "DeLong"}
    aucs, cov = delong(pos, [score])
    half = _Z * float(np.sqrt(max(cov[0, 0], 0.0)))
    a = float(aucs[0])
    return {"value": a, "ci95": [max(0.0, a - half), min(1.0, a + half)], "method": "DeLong"}


def delong_paired(positive: B, a: F64, b: F64) -> dict[str, Any]:
    """DeLong's test of AUC(a) = AUC(b) on the same slides: difference and two-sided p."""
    pos = np.asarray(positive, dtype=bool)
    if min(int(pos.sum()), int((~pos).sum())) < 2:
        return {"auc_difference": None, "p_value": None}
    aucs, cov = delong(pos, [a, b])
    var = float(cov[0, 0] + cov[1, 1] - 2.0 * cov[0, 1])
    diff = float(aucs[0] - aucs[1])
    if var <= 0.0:
        return {"auc_difference": diff, "p_value": 1.0 if diff == 0.0 else 0.0}
    z = diff / np.sqrt(var)
    return {"auc_difference": diff, "p_value": float(2.0 * (1.0 - NormalDist().cdf(abs(z))))}


def mcnemar_paired(correct_a: B, correct_b: B) -> dict[str, Any]:
    """McNemar's exact test on two models' correct/incorrect decisions on the same slides."""
    a = np.asarray(correct_a, dtype=bool)
    b = np.asarray(correct_b, dtype=bool)
    table = [[int((a & b).sum()), int((a & ~b).sum())], [int((~a & b).sum()), int((~a & ~b).sum())]]
    res = mcnemar(table, exact=True)
    return {"table": table, "p_value": float(res.pvalue)}


def _f1(tp: int, fp: int, fn: int) -> float | None:
    d = 2 * tp + fp + fn
    return None if d == 0 else 2 * tp / d


def per_class(y_true: I64, y_pred: I64, classes: Sequence[str], seed: int = 0) -> dict[str, Any]:
    """One-vs-rest sensitivity, specificity (Wilson 95 %) and F1 (bootstrap 95 %) per class."""
    rng = np.random.default_rng(seed)
    boots = rng.integers(0, y_true.size, size=(BOOTSTRAP, y_true.size))
    out: dict[str, Any] = {}
    for c, name in enumerate(classes):
        t, p = y_true == c, y_pred == c
        tp, fp, fn = int((t & p).sum()), int((~t & p).sum()), int((t & ~p).sum())
        f1s = [
            v
            for idx in boots
            if (v := _f1(
                int((t[idx] & p[idx]).sum()), int((~t[idx] & p[idx]).sum()),
                int((t[idx] & ~p[idx]).sum()),
            )) is not None
        ]  # fmt: skip
        f1 = _f1(tp, fp, fn)
        ci = [float(np.quantile(f1s, 0.025)), float(np.quantile(f1s, 0.975))] if f1s else None
        out[name] = {
            "sensitivity": proportion(tp, int(t.sum())),
            "specificity": proportion(int((~t & ~p).sum()), int((~t).sum())),
            "f1": {"value": f1, "ci95": ci if f1 is not None else None, "method": "bootstrap"},
        }
    return out


COLLAPSE_SHARE = 0.95  # one class in at least this share of the predictions
CHANCE_LOSS_FRACTION = 0.95  # validation loss within 5 % of a uniform guess (ln K)


def collapse_reason(
    y_true: I64, y_pred: I64, val_loss: float | None = None, num_classes: int | None = None
) -> str | None:
    """Why a fold's model looks collapsed, or None.

    Collapsed: the test slides hold several classes, yet one class takes at least
    ``COLLAPSE_SHARE`` of the predictions (and is not itself that common among the truths); or
    the class-weighted validation loss is at chance level (a uniform guess scores ``ln K``).
    """
    y_true = np.asarray(y_true)
    y_pred = np.asarray(y_pred)
    if y_pred.size and np.unique(y_true).size > 1:
        values, counts = np.unique(y_pred, return_counts=True)
        top = int(np.argmax(counts))
        share = counts[top] / y_pred.size
        truth_share = float((y_true == values[top]).mean())
        if share >= COLLAPSE_SHARE and truth_share < COLLAPSE_SHARE:
            return (
                f"class {int(values[top])} predicted for {int(counts[top])} of {y_pred.size} slides"
            )
    if val_loss is not None and num_classes is not None and num_classes > 1:
        chance = float(np.log(num_classes))
        if val_loss >= CHANCE_LOSS_FRACTION * chance:
            return (
                f"validation loss {val_loss:.3f} at chance level (ln {num_classes} = {chance:.3f})"
            )
    return None


def collapsed(y_true: I64, y_pred: I64) -> bool:
    """True when one class takes nearly every prediction though the truths are mixed."""
    return collapse_reason(y_true, y_pred) is not None


def per_patient(
    patients: Sequence[str], positive: B, p_high: F64, threshold: F64
) -> dict[str, Any] | None:
    """Patient-level AUC, sensitivity and specificity; None when every patient has one slide."""
    names = sorted(set(patients))
    if len(names) == len(patients):
        return None
    index = {p: i for i, p in enumerate(names)}
    g = np.array([index[p] for p in patients])
    count = np.bincount(g, minlength=len(names)).astype(np.float64)
    prob = np.bincount(g, weights=p_high, minlength=len(names)) / count
    thr = np.bincount(g, weights=threshold, minlength=len(names)) / count
    pos = np.bincount(g, weights=positive.astype(np.float64), minlength=len(names)) > 0
    called = prob >= thr
    return {
        "patients": len(names),
        "aggregation": "mean p(high) over the patient's slides; positive if any slide is",
        "roc_auc": auc_with_interval(pos, prob),
        "sensitivity": proportion(int((pos & called).sum()), int(pos.sum())),
        "specificity": proportion(int((~pos & ~called).sum()), int((~pos).sum())),
    }
