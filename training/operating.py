"""The shipped model's operating point, measured on slides it never trained on.

The default final model (``final="all"``) is trained on about four fifths of the patients and
keeps the rest as a *calibration split* (patient-grouped, stratified).  It is trained like a fold
model: early stopping on an inner validation split of its own training patients.

Its thresholds (:func:`transferred`) take their *rank levels* from the cross-validation and
their *scale* from the calibration split: the decision threshold and abstain band are chosen
(smoothed, with the referral bound, :mod:`training.thresholds`) on the folds' out-of-fold
predictions expressed as percentiles within each fold (the calibration split's slides left
out; scale-free, so the fold models pool), then read off at the same percentiles of the shipped
model's own calibration scores.  The split's labels are never used for them, so the split's
figures at the shipped thresholds are held out; and the ~4x larger out-of-fold set keeps the
decision threshold from swinging with one or two calibration slides (a 90 % sensitivity target
on ~14 high-risk slides is set by the lowest one or two).  The band is then narrowed until it
holds at most as many calibration slides as keep the referral rate on new slides within
``--max-referral`` at ``--referral-confidence``; the bundle records that bound
(``training.operating_point.referral_rate``).

Without a usable out-of-fold reference (one risk class) the thresholds are chosen on the split
itself, and its figures are *cross-fitted* instead: the split is halved (by patient), each half
scored with thresholds chosen on the other half.

Temperature scaling (``--temperature-scaling``) is kept only when it lowers the held-out
negative log-likelihood (each half's temperature scored on the other half); otherwise the
temperature stays 1 and the report says so.  A temperature does not change ranks, so it moves
the thresholds' p(high) values but not the slides they decide.

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
from scipy.stats import rankdata
from sklearn.model_selection import StratifiedGroupKFold

from inference.bundle import OperatingPoint, Thresholds
from training.compare import auc_with_interval
from training.data import PrepStats
from training.metrics import calibration, high_risk_probability, proportion, referral_figures
from training.thresholds import (
    BANDWIDTH_FLOOR,
    DEFAULT_REFERRAL_CONFIDENCE,
    Choice,
    Smoothed,
    bisect_increasing,
    choose_thresholds,
    fit_temperature,
    logit_scores,
    max_slides_in_band,
    referral_upper_bound,
    sigmoid,
    softmax_t,
)

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
    referral_confidence: float = DEFAULT_REFERRAL_CONFIDENCE


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
            positive[a],
            pa,
            target.sensitivity,
            t,
            max_referral=target.max_referral,
            confidence=target.referral_confidence,
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


@dataclass(frozen=True)
class Reference:
    """Out-of-fold evidence for the shipped thresholds' *rank levels*.

    ``level`` is each slide's mid-rank percentile among its fold's test slides under that
    fold's model: scale-free, so the folds' models pool although their p(high) scales differ.
    The calibration split's slides are left out (their labels never touch the thresholds).
    """

    positive: B
    level: F64

    @property
    def usable(self) -> bool:
        """Both risk classes present."""
        return bool(self.positive.any() and (~self.positive).any())


def fold_levels(p_high: F64, folds: Sequence[tuple[I64, I64]]) -> F64:
    """Each slide's mid-rank percentile, (rank - 0.5) / n, among its fold's test slides."""
    out = np.full(p_high.size, np.nan)
    for _, test in folds:
        out[test] = (rankdata(p_high[test], method="average") - 0.5) / test.size
    return out


def _smoothed_scores(ph: F64) -> Smoothed:
    """The calibration scores' kernel-smoothed distribution on the logit scale (as
    :mod:`training.thresholds` smooths validation scores): between two of ~30 scores the
    empirical quantile jumps by a whole gap."""
    z = logit_scores(ph)
    return Smoothed.fit(z, BANDWIDTH_FLOOR * float(np.std(z)))


def _at_level(fit: Smoothed, level: float) -> float:
    """p(high) at percentile ``level`` of the smoothed calibration scores."""
    return sigmoid(fit.quantile(min(max(level, 0.0), 1.0)))


def transferred(ph: F64, ref: Reference, target: Target, t: float) -> Choice:
    """The shipped thresholds: rank levels from the cross-validation, scale from ``ph``.

    The decision threshold and band are chosen (:func:`~training.thresholds.choose_thresholds`)
    on the reference's percentile levels, where ~four times more labelled slides than the
    calibration split hold them steady, then read off at the same percentiles of the shipped
    model's own calibration scores.  Only those scores (not their labels) are used, so the
    split's figures at the shipped thresholds are held out.  The band is then narrowed towards
    the decision (common factor, on the level scale) until it holds at most
    :func:`~training.thresholds.max_slides_in_band` calibration slides; as the levels were
    fixed without the split, the referral rate on new slides is then at most ``max_referral``
    with probability ``confidence`` (Beta bound on the covered order statistics).
    """
    ref_choice = choose_thresholds(
        ref.positive,
        ref.level,
        target.sensitivity,
        max_referral=target.max_referral,
        confidence=target.referral_confidence,
    )
    r = ref_choice.thresholds
    q_lo, q_d, q_hi = r.abstain_low, r.decision, r.abstain_high
    n = int(ph.size)
    most = max_slides_in_band(n, target.max_referral, target.referral_confidence)

    fit = _smoothed_scores(ph)
    d = _at_level(fit, q_d)

    def band(a: float) -> tuple[float, float]:
        return _at_level(fit, q_d - a * (q_d - q_lo)), _at_level(fit, q_d + a * (q_hi - q_d))

    def inside(a: float) -> int:
        lo, hi = band(a)
        return int(((ph >= lo) & (ph <= hi)).sum())

    problems = [p for p in [ref_choice.problem] if p]
    a = 1.0
    if inside(1.0) > most:
        a = bisect_increasing(lambda x: inside(x) - most - 0.5, 0.0, 1.0)
        problems.append(
            f"the band at the reference's levels holds {inside(1.0)} of the {n} calibration "
            f"slides; --max-referral {target.max_referral:g} at confidence "
            f"{target.referral_confidence:g} allows {max(most, 0)}: narrowed to hold {inside(a)}"
        )
    lo, hi = band(a)
    k = inside(a)
    th = Thresholds(
        decision=d,
        abstain_low=min(lo, d),
        abstain_high=max(hi, d),
        chosen_on="validation",
        target_sensitivity=target.sensitivity,
        temperature=t,
    )
    bound: dict[str, object] = {
        "max_referral": target.max_referral,
        "confidence": target.referral_confidence,
        "max_slides_in_band": max(most, 0),
        "slides_in_band": k,
        "slides": n,
        "upper_bound": 0.0 if lo == hi else referral_upper_bound(k, n, target.referral_confidence),
        "levels": {"abstain_low": q_lo, "decision": q_d, "abstain_high": q_hi, "narrowed_by": a},
    }
    return Choice(th, n, "; ".join(problems) or None, ref_choice.expected, bound)


def _figures(positive: B, ph: F64, th: Thresholds) -> dict[str, Any]:
    called = ph >= th.decision
    return {
        **referral_figures(positive, ph, th.abstain_low, th.abstain_high),
        "sensitivity_at_decision": _share(called & positive, positive),
        "specificity_at_decision": _share(~called & ~positive, ~positive),
        "roc_auc": auc_with_interval(positive, ph),
    }


def calibrate(
    z: F64,
    labels: I64,
    groups: Sequence[str],
    *,
    high: Sequence[int],
    target: Target,
    seed: int,
    reference: Reference | None = None,
) -> Calibrated:
    """Temperature and thresholds of the shipped model on its calibration split (module doc)."""
    parts = halves(labels, groups, seed)
    t, t_report = temperature(z, labels, parts, target.temperature_scaling)
    positive = np.isin(labels, list(high))
    ph = high_risk_probability(softmax_t(z, t), high)
    if reference is not None and reference.usable:
        choice = transferred(ph, reference, target, t)
        method = (
            f"rank levels from {reference.level.size} out-of-fold slides (the calibration split "
            "left out), read off the shipped model's calibration scores (labels unused)"
        )
    else:
        choice = choose_thresholds(
            positive,
            ph,
            target.sensitivity,
            t,
            max_referral=target.max_referral,
            confidence=target.referral_confidence,
        )
        method = "smoothed fit on the calibration split (no usable out-of-fold reference)"
    th = choice.thresholds
    report: dict[str, Any] = {
        "measured_on": "held-out calibration split (patients the shipped model never trained on)",
        "slides": int(labels.size),
        "method": method,
        "thresholds": choice.to_json(),
        "temperature": t_report,
        "calibration_before": calibration(positive, high_risk_probability(softmax_t(z, 1.0), high)),
        "calibration_after": calibration(positive, ph),
        "on_split_with_its_own_thresholds": _figures(positive, ph, th),
        "cross_fitted": None,
        "collapsed": collapse_of(positive, ph),
    }
    bound = choice.bound or {}
    # What the bundle promises: the shipped band's referral rate on new slides is at most this
    # with probability ``confidence`` (order statistics of the split's own scores; at most
    # --max-referral by construction).  The health period tests observed referrals against it.
    rate = float(bound.get("upper_bound", 1.0))  # type: ignore[arg-type]
    report["validated_referral_rate"] = {
        "value": rate,
        "meaning": f"upper {float(bound.get('confidence', 0.95)):.0%} bound of the shipped "  # type: ignore[arg-type]
        f"band's referral rate on new slides: it holds {bound.get('slides_in_band')} of the "
        f"{bound.get('slides')} calibration slides",
    }
    if reference is not None and reference.usable:
        report["held_out"] = report["on_split_with_its_own_thresholds"]
        report["note"] = (
            "held_out: the calibration split at the shipped thresholds; the split's labels "
            "were not used to choose them (only its scores' percentiles)"
        )
    elif parts is not None:
        cf = _cross_fitted(
            positive,
            z,
            labels,
            high=high,
            parts=parts,
            target=target,
            use_t=bool(t_report["used"]),
        )
        report["cross_fitted"] = report["held_out"] = cf
        report["note"] = (
            "held_out = cross_fitted: each half of the split scored with thresholds chosen on "
            "the other half; on_split_with_its_own_thresholds is optimistic"
        )
    else:
        report["held_out"] = None
        report["note"] = "split too small to hold figures out; on_split figures are optimistic"
    return Calibrated(choice, report, rate, int(labels.size))


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
