"""The shipped model's operating point, measured on slides it never trained on.

The default final model (``final="all"``) is trained on about four fifths of the patients and
keeps the rest as a *calibration split* (patient-grouped, stratified).  Its epoch count comes
from the cross-validation folds' early stopping (other slides' decisions); its temperature and
thresholds come from the calibration split; so epoch, temperature and thresholds are never all
chosen on the same slides.

On the calibration split the figures are *cross-fitted*: the split is halved (by patient), each
half is scored with thresholds (and temperature) chosen on the other half, and the two halves'
figures are pooled.  They are what the shipped thresholds do on slides the choice never saw.
The shipped thresholds themselves are chosen on the whole split.

Temperature scaling (``--temperature-scaling``) is kept only when it lowers the cross-fitted
negative log-likelihood (each half's temperature scored on the other half); otherwise the
temperature stays 1 and the report says so.

``final="best-fold"`` ships a fold model: its thresholds are its fold's (chosen on that fold's
inner validation slides) and its operating point is that fold's test slides'.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from scipy.special import log_softmax
from sklearn.model_selection import StratifiedGroupKFold

from inference.bundle import OperatingPoint
from training.compare import auc_with_interval
from training.data import PrepStats
from training.metrics import calibration, high_risk_probability, proportion, referral_figures
from training.thresholds import Choice, choose_thresholds, fit_temperature, softmax_t

log = logging.getLogger(__name__)

F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]
B = npt.NDArray[np.bool_]
Half = tuple[I64, I64]  # (choose on, score on), local indices into the calibration split


@dataclass(frozen=True)
class Target:
    """What the thresholds aim at."""

    sensitivity: float
    max_referral: float
    temperature_scaling: bool


@dataclass
class Calibrated:
    """The shipped thresholds and what they do on the calibration split."""

    choice: Choice
    report: dict[str, Any]
    referral_rate: float
    slides: int


def halves(labels: I64, groups: Sequence[str], seed: int) -> list[Half] | None:
    """Two patient-grouped, stratified halves (each way round), or None when impossible."""
    if len(set(groups)) < 2 or np.unique(labels).size < 2:
        return None
    if int(np.bincount(labels)[np.unique(labels)].min()) < 2:
        return None
    splitter = StratifiedGroupKFold(n_splits=2, shuffle=True, random_state=seed)
    x = np.zeros((labels.size, 1))
    out = [
        (np.asarray(a, dtype=np.int64), np.asarray(b, dtype=np.int64))
        for a, b in splitter.split(x, labels, groups=list(groups))
    ]
    return out if all(a.size and b.size for a, b in out) else None


def _nll(z: F64, y: I64, t: float) -> float:
    return float(-log_softmax(z / t, axis=1)[np.arange(y.size), y].mean())


def temperature(
    z: F64, y: I64, parts: list[Half] | None, wanted: bool
) -> tuple[float, dict[str, Any]]:
    """The temperature to ship and why: fitted on the split only if it helps held out."""
    if not wanted:
        return 1.0, {"used": False, "value": 1.0, "reason": "not requested"}
    if parts is None:
        return 1.0, {"used": False, "value": 1.0, "reason": "split too small to test it held out"}
    with_t = without = 0.0
    for a, b in parts:
        t = fit_temperature(z[a], y[a])
        with_t += _nll(z[b], y[b], t) * b.size
        without += _nll(z[b], y[b], 1.0) * b.size
    n = sum(b.size for _, b in parts)
    record = {"heldout_nll_scaled": with_t / n, "heldout_nll_unscaled": without / n}
    if with_t >= without:
        return 1.0, {
            "used": False,
            "value": 1.0,
            "reason": "did not lower the held-out negative log-likelihood",
            **record,
        }
    t = fit_temperature(z, y)
    return t, {"used": True, "value": t, "reason": "lowered the held-out NLL", **record}


def _cross_fitted(
    positive: B,
    z: F64,
    y: I64,
    *,
    high: Sequence[int],
    parts: list[Half],
    target: Target,
    use_t: bool,
) -> dict[str, Any]:
    """Each half scored with the temperature and thresholds chosen on the other half."""
    n = y.size
    lo = np.zeros(n)
    hi = np.zeros(n)
    dec = np.zeros(n)
    ph = np.zeros(n)
    problems = []
    for a, b in parts:
        t = fit_temperature(z[a], y[a]) if use_t else 1.0
        pa = high_risk_probability(softmax_t(z[a], t), high)
        c = choose_thresholds(
            positive[a], pa, target.sensitivity, t, max_referral=target.max_referral
        )
        if c.problem:
            problems.append(c.problem)
        ph[b] = high_risk_probability(softmax_t(z[b], t), high)
        th = c.thresholds
        lo[b], dec[b], hi[b] = th.abstain_low, th.decision, th.abstain_high
    pos = positive
    called = ph >= dec
    return {
        **referral_figures(pos, ph, lo, hi),
        "sensitivity_at_decision": _share(called & pos, pos),
        "specificity_at_decision": _share(~called & ~pos, ~pos),
        "roc_auc": auc_with_interval(pos, ph),
        "problems": problems,
    }


def _share(hit: B, of: B) -> dict[str, Any]:
    return proportion(int(hit.sum()), int(of.sum()))


FLAT_SPREAD = 1e-6  # p(high) differing by less than this across the split: one answer for all


def collapse_of(positive: B, p_high: F64) -> str | None:
    """Why the shipped model looks collapsed on its calibration split, or None."""
    if p_high.size and float(np.ptp(p_high)) < FLAT_SPREAD:
        return (
            f"the shipped model gives every calibration slide p(high) = {float(p_high[0]):.4f}: "
            "it predicts one answer for all slides (collapsed); do not ship it"
        )
    auc = auc_with_interval(positive, p_high)["value"]
    if auc is not None and auc <= 0.5:
        return f"the shipped model ranks its calibration slides at chance (AUC {auc:.3f})"
    return None


def calibrate(
    z: F64, labels: I64, groups: Sequence[str], *, high: Sequence[int], target: Target, seed: int
) -> Calibrated:
    """Temperature and thresholds of the shipped model on its calibration split (module doc)."""
    parts = halves(labels, groups, seed)
    t, t_report = temperature(z, labels, parts, target.temperature_scaling)
    positive = np.isin(labels, list(high))
    ph = high_risk_probability(softmax_t(z, t), high)
    choice = choose_thresholds(
        positive, ph, target.sensitivity, t, max_referral=target.max_referral
    )
    th = choice.thresholds
    report: dict[str, Any] = {
        "measured_on": "held-out calibration split (patients the shipped model never trained on)",
        "slides": int(labels.size),
        "thresholds": choice.to_json(),
        "temperature": t_report,
        "calibration_before": calibration(positive, high_risk_probability(softmax_t(z, 1.0), high)),
        "calibration_after": calibration(positive, ph),
        "on_split_with_its_own_thresholds": referral_figures(
            positive, ph, th.abstain_low, th.abstain_high
        ),
        "cross_fitted": None,
        "collapsed": collapse_of(positive, ph),
        "note": "cross_fitted: each half of the split scored with thresholds chosen on the other "
        "half (slides the choice never saw); on_split_with_its_own_thresholds is optimistic",
    }
    rate = report["on_split_with_its_own_thresholds"]["referral_rate"]["value"]
    if parts is not None:
        cf = _cross_fitted(
            positive,
            z,
            labels,
            high=high,
            parts=parts,
            target=target,
            use_t=bool(t_report["used"]),
        )
        report["cross_fitted"] = cf
        rate = cf["referral_rate"]["value"]
    return Calibrated(choice, report, float(rate or 0.0), int(labels.size))


def operating_point(
    referral_rate: float, slides: int, stats: PrepStats, measured_on: str
) -> OperatingPoint:
    """What the bundle records for the OTA health period (``training.operating_point``)."""
    read = max(stats.slides_in_manifest, 1)
    unusable = sum(
        1 for s in stats.slides_excluded if "no field passed QC" in str(s.get("reason", ""))
    )
    acceptance = stats.fields_used / stats.fields_total if stats.fields_total else None
    return OperatingPoint(
        referral_rate=min(max(referral_rate, 0.0), 1.0),
        slides=slides,
        no_usable_field_rate=unusable / read,
        field_acceptance=acceptance,
        measured_on=measured_on,
    )
