"""Received bytes to a typed message, by topic kind: one entry point for every consumer.

``parse_message("result", payload)`` decodes strict JSON within size and depth bounds
(:func:`deploy.requests.parse_command`: a payload nested 100,000 deep or holding ``NaN`` is
refused before it can hurt the parser), upgrades older result formats and validates against the
one model of that kind.  Every refusal is a :class:`MessageError` (a ``ValueError``) with one line
naming the problem, so a consumer can set the message aside as a data error.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, ValidationError

from deploy.messages.availability import Availability
from deploy.messages.metrics import MetricsMessage
from deploy.messages.ota_state import OtaStateMessage
from deploy.messages.receipt import ReceiptMessage
from deploy.messages.reply import ReplyMessage
from deploy.messages.result import parse_result
from deploy.messages.status import StatusMessage
from deploy.requests import RequestError, parse_command
from firmware_bridge.validation import first_error

MAX_MESSAGE_BYTES = 4 * 1024 * 1024  # a result with a long spectrum is tens of kB
MAX_MESSAGE_DEPTH = 16  # the deepest product payload nests 6 levels


class MessageError(ValueError):
    """A payload that is not a valid message of its kind (a data error, never worth a retry)."""


_PARSERS: dict[str, Callable[[Any], BaseModel]] = {
    "result": parse_result,
    "status": StatusMessage.model_validate,
    "ota/state": OtaStateMessage.model_validate,
    "metrics": MetricsMessage.model_validate,
    "receipt": ReceiptMessage.model_validate,
    "reply": ReplyMessage.model_validate,
}
KINDS = (*_PARSERS, "availability")


def parse_message(kind: str, payload: bytes) -> BaseModel | None:
    """The typed message of topic kind ``kind``; None for an empty (cleared retained) payload."""
    if not payload:
        return None
    if kind == "availability":
        return _validated(kind, Availability.model_validate, payload.decode("utf-8", "replace"))
    parser = _PARSERS.get(kind)
    if parser is None:
        raise MessageError(f"{kind}: not a message kind ({', '.join(KINDS)})")
    try:
        data = parse_command(payload, MAX_MESSAGE_BYTES, MAX_MESSAGE_DEPTH)
    except RequestError as exc:
        raise MessageError(f"{kind}: {exc}") from None
    return _validated(kind, parser, data)


def _validated(kind: str, parser: Callable[[Any], BaseModel], data: Any) -> BaseModel:
    try:
        return parser(data)
    except ValidationError as exc:
        raise MessageError(f"{kind}: {first_error(exc)}") from None
    except ValueError as exc:  # the upgrade chain's refusals
        raise MessageError(f"{kind}: {exc}") from None
