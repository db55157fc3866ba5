"""The decision rule: one call per slide, from the probabilities and the bundle's thresholds.

For every task the rule is the same: p(high) is the summed probability of the classes whose
risk is ``high``; p(high) >= ``thresholds.decision`` decides the high side, else the low side;
the slide's ``label`` is the most probable class *on the decided side* (binary task: the label
is the risk itself; pap4: II or III on the low side, IV or V on the high side).  So the label,
the risk, badges, exports and alerts can never disagree.  The arg-max over all classes is kept
apart as ``argmax_label``.  A slide is abstained (no label, no risk, ``side`` and ``band``
stated) when it has fewer usable fields than ``scan.min_usable_fields``, when its spectrum is
out of range, or when p(high) lies inside the abstain band, in that order.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from inference.result import (
    AbstainReason,
    Measure,
    Prediction,
    Risk,
    insufficient_fields_text,
    measure,
)


@dataclass(frozen=True)
class Limits:
    """The thresholds a slide is held against (the bundle's, plus ``scan.min_usable_fields``)."""

    decision: float
    band: tuple[float, float]
    out_of_range: float | None = None
    min_usable_fields: int = 1


@dataclass(frozen=True)
class Call:
    """The prediction and, when abstained, why: code, text and the measures behind it."""

    prediction: Prediction
    reason: AbstainReason | None = None
    reason_text: str | None = None
    details: tuple[Measure, ...] = ()


def side_of(p_high: float, decision: float) -> Risk:
    """The side of the decision threshold ``p_high`` falls on."""
    return "high" if p_high >= decision else "low"


def decided_label(
    probabilities: Mapping[str, float], risk_of: Mapping[str, str], side: Risk
) -> str:
    """The most probable class whose risk is ``side`` (ties: the first in class order)."""
    candidates = [c for c in probabilities if risk_of[c] == side]
    return max(candidates, key=lambda c: probabilities[c])


def _abstain_reason(
    p_high: float, limits: Limits, mass_outside: float, usable: tuple[int, int]
) -> tuple[AbstainReason, str, Measure] | None:
    n_ok, n_all = usable
    # A scan of fewer fields than the minimum needs all of them (a one-field scan is asked for).
    needed = max(1, min(limits.min_usable_fields, n_all))
    if n_ok < needed:
        code = AbstainReason.INSUFFICIENT_FIELDS
        m = measure(code.value, "usable_fields", n_ok, "<", needed)
        return code, insufficient_fields_text(n_ok, n_all, limits.min_usable_fields), m
    if limits.out_of_range is not None and mass_outside > limits.out_of_range:
        code = AbstainReason.OUT_OF_RANGE
        m = measure(code.value, "mass_outside_window", mass_outside, ">", limits.out_of_range)
        return code, f"spectrum unlike the training data: {m.text}", m
    lo, hi = limits.band
    if lo <= p_high <= hi:
        code = AbstainReason.UNCERTAIN_PROBABILITY
        m = measure(code.value, "p_high", p_high, "in", (lo, hi))
        side = side_of(p_high, limits.decision)
        text = f"{m.text}; it leans {side} (decision threshold {limits.decision:.4g})"
        return code, text, m
    return None


def decide(
    classes: Sequence[str],
    probabilities: Sequence[float],
    risk_of: Mapping[str, str],
    limits: Limits,
    *,
    mass_outside: float = 0.0,
    usable: tuple[int, int] = (1, 1),
) -> Call:
    """The call for one slide: ``usable`` is (fields that passed QC, fields scanned)."""
    probs = {c: float(p) for c, p in zip(classes, probabilities, strict=True)}
    p_high = min(1.0, max(0.0, sum(p for c, p in probs.items() if risk_of[c] == "high")))
    side = side_of(p_high, limits.decision)
    common: dict[str, Any] = {
        "probabilities": probs,
        "p_high": p_high,
        "argmax_label": max(probs, key=lambda c: probs[c]),
        "decision": limits.decision,
        "band": limits.band,
    }
    why = _abstain_reason(p_high, limits, mass_outside, usable)
    if why is None:
        label = decided_label(probs, risk_of, side)
        return Call(Prediction(label=label, risk=side, abstained=False, **common))
    code, text, m = why
    prediction = Prediction(label=None, risk=None, abstained=True, side=side, **common)
    return Call(prediction, code, text, (m,))
