"""What both archive databases (and Python) can hold: every value is checked before an insert.

A value that SQLite would take and PostgreSQL refuse (a NUL in a string, a string longer than its
column, an integer beyond ``BIGINT``), or that Python cannot even convert (a 401-digit
probability, a year-0001 time with an offset, a JSON document nested 100,000 deep) is a *data*
error: :class:`~deploy.exceptions.MessageRejectedError`, raised here, long before the database
could blame itself for it.  The collector sets such a message aside in the ``rejected`` table
and acknowledges it (docs/collector.md, "Failure classes").

The checks follow the columns of :mod:`deploy.collector.tables`; keep them in step.
"""

from __future__ import annotations

import json
import math
import re
from datetime import datetime, timedelta, timezone
from typing import Any, cast

from deploy.collector.outcome import check_result, outcome_of
from deploy.collector.qcsample import qc_rank
from deploy.exceptions import MessageRejectedError
from deploy.messages.availability import Availability
from deploy.messages.base import Message
from deploy.messages.parsing import MessageError, parse_message
from firmware_bridge.limits import IDENTIFIER_RE

BIGINT_MIN, BIGINT_MAX = -(2**63), 2**63 - 1
MAX_DEPTH = 32  # deeper JSON is no result; also keeps every later json.dumps far from recursion
EARLIEST = datetime(1900, 1, 1)  # both databases, Python and RFC 3339 agree inside this window
LATEST = datetime(9999, 1, 1)
MAX_REASON = 4000  # outcome reasons are Text; a bound keeps one message from bloating a page
_VISITED = (dict, list, str)
UUID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\Z")
# Column lengths of ``results`` (String(n)); the names are the result's own keys.
LENGTHS = {"boot_id": 128, "slide_id": 128, "scan_id": 128}
# How far a device's clock may run ahead of the archive's before its times are bounded for
# ordering (docs/collector.md, "Device clocks").  NTP keeps honest devices well inside it.
MAX_CLOCK_SKEW = timedelta(minutes=5)


def bounded_time(device_time: datetime, received_at: datetime) -> datetime:
    """``device_time``, but never later than ``received_at`` + :data:`MAX_CLOCK_SKEW`."""
    return min(device_time, received_at + MAX_CLOCK_SKEW)


def contract_checked(result: dict[str, Any]) -> dict[str, Any]:
    """``result`` upgraded to the current format and validated by the message model
    (:mod:`deploy.messages`); a violation is a data error naming the field."""
    try:
        return check_result(result)
    except ValueError as exc:
        message = str(exc).removeprefix("result: ")  # the model's errors already say where
        raise MessageRejectedError(f"result: {message[:300]}") from exc


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _finite(literal: str) -> float:
    value = float(literal)
    if not math.isfinite(value):  # 1e400
        raise ValueError(f"number {literal[:20]} is out of range")
    return value


def decode(payload: bytes) -> Any:
    """``payload`` as strict JSON: UTF-8, no NaN/Infinity, not too deep, every value storable."""
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise MessageRejectedError(f"not UTF-8 (invalid byte at offset {exc.start})") from exc
    try:
        data = json.loads(text, parse_constant=_refuse_constant, parse_float=_finite)
    except RecursionError as exc:
        raise MessageRejectedError("JSON nested too deeply") from exc
    except ValueError as exc:  # includes ints beyond Python's 4300-digit conversion limit
        raise MessageRejectedError(f"not JSON: {str(exc)[:200]}") from exc
    check_values(data)
    return data


def check_values(data: Any) -> None:
    """Walk ``data`` without recursion: depth and encodable strings (numbers were checked
    while parsing: :func:`_finite`).

    Large integers inside the payload are fine (it is stored as text; a simulated slide's seed
    is 128 bits); the indexed columns check their own ranges (:func:`integer`).  Only
    containers and strings are visited: a spectrum's hundreds of numbers cost nothing.
    """
    stack: list[tuple[Any, int, str]] = [(data, 1, "")]
    while stack:
        value, depth, path = stack.pop()
        if depth > MAX_DEPTH:
            raise MessageRejectedError(f"JSON nested deeper than {MAX_DEPTH} levels at {path}")
        if isinstance(value, dict):
            for key, item in value.items():
                _check_string(key, f"{path}.{key[:40]}")
                if isinstance(item, _VISITED):
                    stack.append((item, depth + 1, f"{path}.{key[:40]}"))
        elif isinstance(value, list):
            stack.extend(
                (item, depth + 1, f"{path}[{i}]")
                for i, item in enumerate(value)
                if isinstance(item, _VISITED)
            )
        elif isinstance(value, str):
            _check_string(value, path)
        elif isinstance(value, float) and not math.isfinite(value):
            raise MessageRejectedError(f"{path or '(root)'}: number out of range")


def _check_string(value: str, path: str) -> None:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:  # a lone surrogate from a \ud800 escape
        raise MessageRejectedError(f"{path or '(root)'}: not a valid Unicode string") from exc


def text(value: Any, name: str, max_length: int | None, *, required: bool = True) -> str | None:
    """A string column's value: a str without NUL, at most ``max_length`` characters."""
    if value is None and not required:
        return None
    if not isinstance(value, str):
        raise MessageRejectedError(f"{name}: expected a string, got {type(value).__name__}")
    if required and not value:
        raise MessageRejectedError(f"{name}: empty")
    if "\x00" in value:
        raise MessageRejectedError(f"{name}: contains a NUL character")
    if max_length is not None and len(value) > max_length:
        raise MessageRejectedError(f"{name}: longer than {max_length} characters ({len(value)})")
    return value


def integer(value: Any, name: str, minimum: int = BIGINT_MIN, *, required: bool = True) -> Any:
    """A BIGINT column's value (an int, not a bool) within ``minimum`` .. 2**63-1."""
    if value is None and not required:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise MessageRejectedError(f"{name}: expected an integer, got {type(value).__name__}")
    if not minimum <= value <= BIGINT_MAX:
        raise MessageRejectedError(f"{name}: {value} is outside {minimum}..{BIGINT_MAX}")
    return value


def probability(value: Any, name: str) -> float:
    """A finite number in [0, 1] (an int of 401 digits included: refused, not overflowed)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise MessageRejectedError(f"{name}: expected a number, got {type(value).__name__}")
    if isinstance(value, int) and not 0 <= value <= 1:
        raise MessageRejectedError(f"{name}: {str(value)[:20]} is not a probability")
    number = float(value)
    if not (math.isfinite(number) and 0.0 <= number <= 1.0):
        raise MessageRejectedError(f"{name}: {number} is not a probability in [0, 1]")
    return number


def timestamp(value: Any, name: str) -> datetime:
    """RFC 3339 with a zone, as naive UTC inside [1900, 9999): both databases can store it."""
    raw = text(value, name, 64)
    try:
        parsed = datetime.fromisoformat(str(raw).replace("Z", "+00:00").replace("z", "+00:00"))
        if parsed.tzinfo is None:
            raise ValueError("no time zone")
        utc = parsed.astimezone(timezone.utc).replace(tzinfo=None)
    except (ValueError, OverflowError) as exc:
        raise MessageRejectedError(f"{name}: not an RFC 3339 time with a zone: {exc}") from exc
    if not EARLIEST <= utc < LATEST:
        raise MessageRejectedError(f"{name}: {utc.isoformat()} is outside 1900..9998")
    return utc


def identifier(value: Any, name: str) -> str:
    """A device id as the device accepts it (:data:`firmware_bridge.limits.IDENTIFIER_RE`)."""
    if not isinstance(value, str) or IDENTIFIER_RE.match(value) is None:
        raise MessageRejectedError(f"{name}: {str(value)[:80]!r} is not a valid id")
    return value


def _mapping(value: Any, name: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise MessageRejectedError(f"{name}: expected an object, got {type(value).__name__}")
    return value


def _p_high(prediction: dict[str, Any]) -> float | None:
    probabilities = _mapping(prediction.get("probabilities"), "prediction.probabilities")
    checked = {
        k: probability(v, f"prediction.probabilities.{k[:40]}") for k, v in probabilities.items()
    }
    if len(checked) == 1:
        raise MessageRejectedError("prediction.probabilities: one class is no distribution")
    if checked and abs(sum(checked.values()) - 1.0) > 0.01:
        raise MessageRejectedError("prediction.probabilities: do not sum to 1")
    value = prediction.get("p_high")
    if value is not None:
        return probability(value, "prediction.p_high")
    return checked.get("high")


def _model_version(model: dict[str, Any]) -> int | None:
    version = model.get("version")
    if isinstance(version, str) and version.isdecimal() and len(version) <= 19:
        version = int(version)  # older apps wrote the version as a string of digits
    return integer(version, "model.version", 0, required=False)  # type: ignore[no-any-return]


def result_row(
    result: Any, device: str, received_at: datetime, text_as_received: str | None = None
) -> dict[str, Any]:
    """The ``results`` row of one decoded result; :class:`MessageRejectedError` names the field.

    ``text_as_received``: the JSON text ``result`` was decoded from (:func:`decode`), stored
    as the payload instead of encoding the result again.
    """
    if not isinstance(result, dict) or result.get("schema") != "omis.result/1":
        raise MessageRejectedError("not a JSON object with schema 'omis.result/1'")
    upgraded = contract_checked(result)
    if upgraded != result:  # an older format: store what the archive reads, not the original
        result, text_as_received = upgraded, None
    message_id = text(result.get("message_id"), "message_id", 64)
    if UUID_RE.match(str(message_id)) is None:
        raise MessageRejectedError(f"message_id: {str(message_id)[:80]!r} is not a UUID")
    device_id = identifier(result.get("device_id"), "device_id")
    if device_id != device:
        raise MessageRejectedError(f"device_id {device_id!r} differs from the topic's {device!r}")
    prediction = _mapping(result.get("prediction"), "prediction")
    if "prediction" not in result:
        raise MessageRejectedError("prediction: missing")
    model = _mapping(result.get("model"), "model")
    try:
        outcome = outcome_of(result)
    except (ValueError, TypeError, AttributeError) as exc:
        raise MessageRejectedError(str(exc)[:300]) from exc
    row = {key: text(result.get(key), key, length) for key, length in LENGTHS.items()}
    finished_at = timestamp(result.get("finished_at"), "finished_at")
    return {
        **row,
        "message_id": message_id,
        "device_id": device_id,
        "seq": integer(result.get("seq"), "seq", 1),
        "started_at": timestamp(result.get("started_at"), "started_at"),
        "finished_at": finished_at,
        "received_at": received_at,
        "sort_at": bounded_time(finished_at, received_at),
        "qc_rank": qc_rank(str(message_id)),
        "outcome": text(outcome.kind, "outcome", 16),
        "outcome_reason": text(outcome.reason, "reason", MAX_REASON, required=False),
        "outcome_stage": text(outcome.stage, "stage", 64, required=False),
        "review": outcome.review,
        "label": text(prediction.get("label"), "prediction.label", 64, required=False),
        "risk": text(prediction.get("risk"), "prediction.risk", 16, required=False),
        "p_high": _p_high(prediction),
        "model_name": text(model.get("name"), "model.name", 128, required=False),
        "model_version": _model_version(model),
        "model_sha256": text(model.get("sha256"), "model.sha256", 64, required=False),
        "payload": text_as_received
        if text_as_received is not None
        else json.dumps(result, separators=(",", ":"), allow_nan=False),
    }


def state_document(payload: bytes, kind: str, device: str) -> dict[str, Any] | None:
    """A retained ``status``/``ota/state`` document (None: cleared), parsed by its message model
    (:func:`deploy.messages.parsing.parse_message`) and returned in the current shape.

    A payload the model refuses -- or a status naming another device than its topic -- is a data
    error: :class:`MessageRejectedError` with the model's one-line reason.
    """
    try:
        message = parse_message(kind, payload)
    except MessageError as exc:
        raise MessageRejectedError(str(exc)[:MAX_REASON]) from None
    if message is None:
        return None
    named = getattr(message, "device_id", device)
    if named != device:
        raise MessageRejectedError(
            f"{kind}: device_id {named!r} differs from the topic's {device!r}"
        )
    return cast(Message, message).to_json()


def availability(payload: bytes) -> str:
    """A retained ``availability`` word (empty: cleared), parsed by its model."""
    word = payload.decode("utf-8", "replace").strip()
    if not word:
        return ""
    try:
        message = parse_message("availability", word.encode("utf-8"))
    except MessageError as exc:
        raise MessageRejectedError(str(exc)[:MAX_REASON]) from None
    return cast(Availability, message).root
