"""What a result says about its slide: outcome, reason, p(high) and whether it needs review.

Current results state ``outcome`` (``classified``, ``abstained`` with a ``reason``, ``failed``
with ``stage`` and ``reason``, ``cancelled``) with ``reason`` and ``stage`` beside it at the top
level (docs/mqtt.md).  Older results have none: the outcome is derived from
``prediction.abstained`` (``abstained``, reason ``prediction.reason`` when given, else
``classified``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

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
    kind = result.get("outcome")
    prediction = result.get("prediction") or {}
    if kind is None:
        if prediction.get("abstained"):
            derived = _text(prediction.get("reason")) or ABSTAIN_DEFAULT_REASON
            return Outcome("abstained", derived)
        return Outcome("classified")
    if kind not in OUTCOMES:
        raise ValueError(f"outcome: unknown kind {kind!r} (expected one of {', '.join(OUTCOMES)})")
    reason, stage = _text(result.get("reason")), _text(result.get("stage"))
    if kind == "abstained" and reason is None:
        reason = _text(prediction.get("reason")) or ABSTAIN_DEFAULT_REASON
    return Outcome(kind, reason, stage)


def p_high(result: dict[str, Any]) -> float | None:
    """The probability of the high-risk class (``prediction.p_high``, else ``probabilities``)."""
    prediction = result.get("prediction") or {}
    value = prediction.get("p_high")
    if value is None:
        value = (prediction.get("probabilities") or {}).get("high")
    return float(value) if isinstance(value, int | float) else None


class ResultEnvelope(BaseModel):
    """What the archive needs of an ``omis.result/1``, accepted from every app version.

    The shipped schema describes the newest payload; a fleet mid-upgrade still sends older
    ones, which the archive must keep.  Other keys are stored as received.
    """

    model_config = ConfigDict(extra="allow")

    schema_: Literal["omis.result/1"] = Field(alias="schema")
    message_id: str = Field(
        pattern=r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$"
    )
    device_id: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    boot_id: str = Field(min_length=1, max_length=128)
    seq: int = Field(ge=1)
    slide_id: str = Field(min_length=1, max_length=128)
    scan_id: str = Field(min_length=1, max_length=128)
    started_at: str
    finished_at: str
    prediction: dict[str, Any]
    model: dict[str, Any] = Field(default_factory=dict)


def check_result(payload: Any) -> dict[str, Any]:
    """``payload`` if it is a storable result; ``ValueError`` naming the first problem."""
    if not isinstance(payload, dict):
        raise ValueError("result: not a JSON object")
    try:
        ResultEnvelope.model_validate(payload)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "(root)"
        raise ValueError(f"result: {where}: {first['msg']}") from exc
    outcome_of(payload)  # an unknown outcome is refused here too
    return payload
