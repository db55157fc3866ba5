"""What a result says about its slide: outcome, reason, p(high) and whether it needs review.

The archive parses every result with the device's own model
(:class:`deploy.messages.result.ResultMessage`), after upgrading older payloads
(:mod:`deploy.messages.migrations`): :func:`check_result` returns the upgraded, validated
result, which :func:`outcome_of` and :func:`p_high` then read.  The vocabulary (outcomes,
reasons, stages) is :mod:`deploy.messages.vocabulary`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from deploy.messages.migrations import upgrade_result
from deploy.messages.result import ResultMessage, parse_result
from deploy.messages.vocabulary import OUTCOMES, needs_review
from firmware_bridge.validation import first_error

__all__ = ["OUTCOMES", "Outcome", "check_result", "outcome_of", "p_high", "parse"]


@dataclass(frozen=True)
class Outcome:
    """The outcome of one slide."""

    kind: str
    reason: str | None = None
    stage: str | None = None

    @property
    def review(self) -> bool:
        """True when a person must look at (or re-scan) the slide."""
        return needs_review(self.kind)


def parse(payload: Any) -> ResultMessage:
    """The typed result; ``ValueError`` naming the first problem (``result: <where>: <what>``)."""
    try:
        return parse_result(payload)
    except ValidationError as exc:
        raise ValueError(f"result: {first_error(exc)}") from None


def check_result(payload: Any) -> dict[str, Any]:
    """The result as the archive stores it (upgraded to the current format, validated);
    ``ValueError`` naming the first problem."""
    return parse(payload).to_json()


def outcome_of(result: dict[str, Any]) -> Outcome:
    """The outcome of a result (one not yet upgraded is read as the upgrade chain would)."""
    if "outcome" not in result:
        result = upgrade_result(result)
    kind = result["outcome"]
    if kind not in OUTCOMES:
        raise ValueError(f"outcome: unknown kind {kind!r} (expected one of {', '.join(OUTCOMES)})")
    return Outcome(kind, result.get("reason"), result.get("stage"))


def p_high(result: dict[str, Any]) -> float | None:
    """The probability of the high-risk class (``prediction.p_high``, else ``probabilities``)."""
    prediction = result.get("prediction") or {}
    value = prediction.get("p_high")
    if value is None:
        value = (prediction.get("probabilities") or {}).get("high")
    return float(value) if isinstance(value, int | float) else None
