"""Pure checks on what a network peer sends the appliance: command payloads and reply topics.

Commands (``<prefix>/<device>/cmd/<verb>``) are bounded before they are parsed: size first
(``too_large``), then UTF-8 and the nesting depth of arrays and objects, counted on the raw
text without recursion (``too_deep``), then strict JSON (``malformed``: not JSON, a
non-finite constant such as ``NaN``, or not an object).  Each is a documented error reply
(docs/mqtt.md, "Errors").

Replies go where they may.  A request's MQTT 5 *response topic* receives a copy of the reply
only when it lies under the device's reply prefix ``<prefix>/<device>/reply/`` (for example
``omis/v1/scope-08/reply/<your user name>/<anything>``, which the shipped ACL lets that user
read).  Anything else (the device's own ``result``, ``status`` or ``availability``, another
device's ``cmd/scan``, a wildcard) gets no copy and a warning; the reply still goes to the
standard ``.../cmd/<verb>/reply`` topic.
"""

from __future__ import annotations

import json
import re
from typing import Any

MAX_JSON_DEPTH = 16
MAX_TOPIC_LEN = 256
REPLY_LEVEL = "reply"

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.DOTALL)
_BRACKET = re.compile(r"[\[\]{}]")


class RequestError(ValueError):
    """A request refused before it reached a handler; ``code`` is the reply's error code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def json_depth(text: str) -> int:
    """The deepest nesting of arrays and objects in JSON ``text`` (strings ignored), iteratively.

    Unbalanced text gets a best-effort answer; the parser reports it afterwards.
    """
    depth = deepest = 0
    for bracket in _BRACKET.findall(_STRING.sub('""', text)):
        if bracket in "[{":
            depth += 1
            deepest = max(deepest, depth)
        else:
            depth = max(depth - 1, 0)
    return deepest


def _refuse_constant(name: str) -> Any:
    raise RequestError("malformed", f"{name} is not allowed (strict JSON: numbers are finite)")


def parse_command(
    payload: bytes, max_bytes: int, max_depth: int = MAX_JSON_DEPTH
) -> dict[str, Any]:
    """Decode one command payload within its bounds, or raise :class:`RequestError`."""
    if len(payload) > max_bytes:
        raise RequestError("too_large", f"{len(payload)} bytes > {max_bytes}")
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RequestError("malformed", f"not UTF-8: {exc.reason} at byte {exc.start}") from exc
    depth = json_depth(text)
    if depth > max_depth:
        raise RequestError("too_deep", f"nested {depth} levels deep, the limit is {max_depth}")
    try:
        request = json.loads(text, parse_constant=_refuse_constant)
    except RequestError:
        raise
    except (ValueError, RecursionError) as exc:
        raise RequestError("malformed", f"not JSON: {exc}") from exc
    if not isinstance(request, dict):
        raise RequestError("malformed", "the payload must be a JSON object")
    return request


def reply_prefix(prefix: str, device_id: str) -> str:
    """The topic prefix under which response topics are honoured: ``<prefix>/<device>/reply/``."""
    return f"{prefix}/{device_id}/{REPLY_LEVEL}/"


def response_topic_problem(topic: str, prefix: str, device_id: str) -> str | None:
    """Why ``topic`` may not receive a reply copy, or None when it may."""
    allowed = reply_prefix(prefix, device_id)
    if len(topic) > MAX_TOPIC_LEN:
        return f"longer than {MAX_TOPIC_LEN} characters"
    if any(c in topic for c in "+#\0") or topic.startswith("$"):
        return "wildcards, NUL and $-topics cannot be published to"
    rest = topic[len(allowed) :] if topic.startswith(allowed) else None
    if not rest or "" in rest.split("/"):
        return f"not under the reply prefix {allowed}"
    return None


def reply_topics(
    standard: str, response_topic: str | None, prefix: str, device_id: str
) -> tuple[list[str], str | None]:
    """The topics a reply goes to, and a warning when the response topic was refused.

    ``standard`` (``.../cmd/<verb>/reply``) always gets the reply; an allowed response topic
    gets a copy.
    """
    if response_topic is None or response_topic == standard:
        return [standard], None
    problem = response_topic_problem(response_topic, prefix, device_id)
    if problem is not None:
        return [standard], f"response topic {response_topic[:120]!r} refused: {problem}"
    return [standard, response_topic], None
