"""What a result says about its slide: outcome, reason, p(high) and whether it needs review.

Newer results carry ``outcome`` (``classified``, ``abstained`` with a ``reason``, ``failed``
with ``stage`` and ``reason``, ``cancelled``), either as a string beside ``outcome_reason`` /
``outcome_stage`` or as an object ``{"status"|"kind": ..., "reason": ..., "stage": ...}``.
Older results have none: it is derived from ``prediction.abstained`` (``abstained`` with
``prediction.reason`` when given, else ``classified``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

OUTCOMES = ("classified", "abstained", "failed", "cancelled")
ABSTAIN_DEFAULT_REASON = "p(high) inside the abstain band"


@dataclass(frozen=True)
class Outcome:
    """The outcome of one slide."""

    kind: str
    reason: str | None = None
    stage: str | None = None

    @property
    def review(self) -> bool:
        """True when a person must look at (or re-scan) the slide."""
        return self.kind != "classified"


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def outcome_of(result: dict[str, Any]) -> Outcome:
    """The result's outcome, stated or derived; raises ``ValueError`` on an unknown kind."""
    raw = result.get("outcome")
    prediction = result.get("prediction") or {}
    if isinstance(raw, dict):
        kind = _text(raw.get("status")) or _text(raw.get("kind")) or _text(raw.get("outcome"))
        reason, stage = _text(raw.get("reason")), _text(raw.get("stage"))
    elif isinstance(raw, str):
        kind = raw
        reason = _text(result.get("outcome_reason")) or _text(result.get("reason"))
        stage = _text(result.get("outcome_stage")) or _text(result.get("stage"))
    elif raw is None:
        if prediction.get("abstained"):
            reason = _text(prediction.get("reason")) or ABSTAIN_DEFAULT_REASON
            return Outcome("abstained", reason)
        return Outcome("classified")
    else:
        raise ValueError(f"outcome: expected a string or an object, got {type(raw).__name__}")
    if kind not in OUTCOMES:
        raise ValueError(f"outcome: unknown kind {kind!r} (expected one of {', '.join(OUTCOMES)})")
    if kind == "abstained" and reason is None:
        reason = _text(prediction.get("reason")) or ABSTAIN_DEFAULT_REASON
    return Outcome(kind, reason, stage)


def p_high(result: dict[str, Any]) -> float | None:
    """The probability of the high-risk class, if the result has one."""
    probabilities = (result.get("prediction") or {}).get("probabilities") or {}
    value = probabilities.get("high")
    return float(value) if isinstance(value, int | float) else None
