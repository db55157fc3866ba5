"""The product's vocabulary, defined once: outcomes, reasons, stages, risks, states, codes.

Outcome, abstain reason and stage are defined in :mod:`inference.result` (the device pipeline
builds them and may not import ``deploy``) and re-exported here for the rest of the product;
everything else is defined here.  The dashboard gets the same words from
:func:`vocabulary` (served by the archive at ``GET /api/vocabulary`` and checked against
``deploy/dashboard/vocabulary.json`` by a drift test).
"""

from __future__ import annotations

import json
from enum import Enum
from pathlib import Path
from typing import Any, Literal, get_args

from inference.result import RISKS, AbstainReason, Outcome, Risk, Stage

DASHBOARD_VOCABULARY = Path(__file__).resolve().parents[1] / "dashboard" / "vocabulary.json"

OUTCOMES: tuple[str, ...] = tuple(o.value for o in Outcome)
ABSTAIN_REASONS: tuple[str, ...] = tuple(r.value for r in AbstainReason)
STAGES: tuple[str, ...] = tuple(s.value for s in Stage)
#: Outcomes a person must look at (or re-scan): everything but a decided call.
REVIEW_OUTCOMES: tuple[str, ...] = tuple(o for o in OUTCOMES if o != Outcome.CLASSIFIED.value)

DeviceState = Literal["idle", "scanning", "updating", "degraded", "error"]
DEVICE_STATES: tuple[str, ...] = get_args(DeviceState)

AvailabilityValue = Literal["online", "stopped", "offline"]
AVAILABILITY: tuple[str, ...] = get_args(AvailabilityValue)


class ReplyCode(str, Enum):
    """Error codes of ``omis.reply/1`` (see :mod:`deploy.appliance.commands`)."""

    MALFORMED = "malformed"
    TOO_LARGE = "too_large"
    TOO_DEEP = "too_deep"
    INVALID = "invalid"
    UNKNOWN_COMMAND = "unknown_command"
    WRONG_DEVICE = "wrong_device"
    QUEUE_FULL = "queue_full"
    OUTBOX_FULL = "outbox_full"
    STOPPING = "stopping"
    NOT_FOUND = "not_found"
    UNAVAILABLE = "unavailable"
    REJECTED = "rejected"
    BUSY = "busy"
    NO_MODEL = "no_model"
    INTERNAL = "internal"


__all__ = [
    "ABSTAIN_REASONS",
    "AVAILABILITY",
    "DEVICE_STATES",
    "OUTCOMES",
    "REVIEW_OUTCOMES",
    "RISKS",
    "STAGES",
    "AbstainReason",
    "AvailabilityValue",
    "DeviceState",
    "Outcome",
    "ReplyCode",
    "Risk",
    "Stage",
    "needs_review",
    "vocabulary",
]


def needs_review(outcome: str) -> bool:
    """True when a slide with this outcome needs a person (no decided call)."""
    return outcome in REVIEW_OUTCOMES


def vocabulary() -> dict[str, Any]:
    """The words the dashboard shows and filters by, as JSON data."""
    return {
        "outcomes": list(OUTCOMES),
        "review_outcomes": list(REVIEW_OUTCOMES),
        "abstain_reasons": list(ABSTAIN_REASONS),
        "stages": list(STAGES),
        "risks": list(RISKS),
        "device_states": list(DEVICE_STATES),
        "availability": list(AVAILABILITY),
    }


def render_vocabulary() -> str:
    """The exact text of ``deploy/dashboard/vocabulary.json``."""
    return json.dumps(vocabulary(), indent=2, allow_nan=False) + "\n"
