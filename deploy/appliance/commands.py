"""Command intake: ``<prefix>/<device>/cmd/<verb>`` -> validated handler -> reply.

Every command gets exactly one reply on ``.../cmd/<verb>/reply`` (``omis.reply/1``) carrying
the request's correlation id: the JSON ``correlation_id`` field if present (MQTT 3.1.1
clients), else the MQTT 5 correlation data; MQTT 5 replies also echo the correlation data as a
property, and an MQTT 5 request's *response topic* under the reply prefix receives a copy of
its reply (:mod:`deploy.requests`).  Errors are replies, never exceptions: ``too_large``,
``too_deep`` (nested deeper than :data:`deploy.requests.MAX_JSON_DEPTH`), ``malformed`` (not
strict JSON or not an object), ``invalid`` (fails the verb's schema), ``unknown_command``,
``wrong_device`` (a ``device_id`` field naming another device), and handler codes (``queue_full``,
``outbox_full``, ``stopping``, ``not_found``, ``unavailable``, ``internal``; ``cmd/ota`` adds
``rejected`` for a refused offer and ``busy`` while another update runs).  Topics of other
devices are never subscribed, so such commands are not seen at all; verbs longer than
:data:`MAX_VERB_LEN` are ignored without a reply.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from deploy.appliance.results import rfc3339
from deploy.exceptions import SchemaError
from deploy.requests import RequestError, parse_command
from deploy.schemas import validate

log = logging.getLogger(__name__)

REPLY_SCHEMA = "omis.reply/1"
MAX_VERB_LEN = 64
MAX_CORRELATION_LEN = 128

Handler = Callable[[dict[str, Any]], dict[str, Any]]
# (verb, reply payload, MQTT 5 correlation data, MQTT 5 response topic)
ReplySender = Callable[[str, bytes, "bytes | None", "str | None"], None]


class CommandFailed(Exception):  # noqa: N818 - a reply, not a crash
    """Raised by a handler to answer with an error ``code``."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class _Route:
    schema: str
    handler: Handler


class CommandRouter:
    """Validates commands against their schemas and dispatches through a table."""

    def __init__(self, device_id: str, max_bytes: int, send_reply: ReplySender) -> None:
        self.device_id = device_id
        self.max_bytes = max_bytes
        self.send_reply = send_reply
        self.counts: dict[str, int] = {}
        self._routes: dict[str, _Route] = {}

    def register(self, verb: str, schema: str, handler: Handler) -> None:
        """Route ``verb`` to ``handler`` after validating against schema ``schema``."""
        self._routes[verb] = _Route(schema, handler)

    @property
    def verbs(self) -> list[str]:
        """The registered verbs."""
        return sorted(self._routes)

    def handle(
        self,
        verb: str,
        payload: bytes,
        correlation: bytes | None,
        response_topic: str | None = None,
    ) -> dict[str, Any] | None:
        """Handle one command and send its reply; returns the reply (None if ignored).

        ``response_topic`` (MQTT 5) is passed on to the reply sender, which copies the reply there.
        """
        if not verb or len(verb) > MAX_VERB_LEN:
            log.warning("ignoring command with an unusable verb (%d chars)", len(verb))
            return None
        request: dict[str, Any] = {}
        try:
            request = self._parse(payload)
            result = self._dispatch(verb, request)
            reply = self._reply(verb, request, correlation, result=result)
        except CommandFailed as exc:
            self.counts[exc.code] = self.counts.get(exc.code, 0) + 1
            log.info("command %s refused: %s: %s", verb, exc.code, exc)
            error = {"code": exc.code, "message": str(exc)[:500]}
            reply = self._reply(verb, request, correlation, error=error)
        self.send_reply(
            verb, json.dumps(reply, allow_nan=False).encode("utf-8"), correlation, response_topic
        )
        return reply

    def _parse(self, payload: bytes) -> dict[str, Any]:
        try:  # size, depth and strict JSON, bounded before parsing (deploy.requests)
            return parse_command(payload, self.max_bytes)
        except RequestError as exc:
            raise CommandFailed(exc.code, str(exc)) from exc

    def _dispatch(self, verb: str, request: dict[str, Any]) -> dict[str, Any]:
        route = self._routes.get(verb)
        if route is None:
            raise CommandFailed("unknown_command", f"unknown command {verb!r}")
        try:
            validate(route.schema, request)
        except SchemaError as exc:
            raise CommandFailed("invalid", str(exc)) from exc
        target = request.get("device_id")
        if target is not None and target != self.device_id:
            raise CommandFailed("wrong_device", f"addressed to {target!r}, not this device")
        self.counts[verb] = self.counts.get(verb, 0) + 1
        try:
            return route.handler(request)
        except CommandFailed:
            raise
        except Exception as exc:
            log.exception("command %s failed", verb)
            raise CommandFailed("internal", f"{type(exc).__name__}: {exc}") from exc

    def _reply(
        self,
        verb: str,
        request: dict[str, Any],
        correlation: bytes | None,
        result: dict[str, Any] | None = None,
        error: dict[str, str] | None = None,
    ) -> dict[str, Any]:
        reply: dict[str, Any] = {
            "schema": REPLY_SCHEMA,
            "device_id": self.device_id,
            "verb": verb,
            "correlation_id": _correlation_id(request, correlation),
            "ok": error is None,
            "at": rfc3339(),
        }
        if error is None:
            reply["result"] = result or {}
        else:
            reply["error"] = error
        return reply


def _correlation_id(request: dict[str, Any], correlation: bytes | None) -> str | None:
    value = request.get("correlation_id")
    if isinstance(value, str):
        return value[:MAX_CORRELATION_LEN]
    if correlation:
        return correlation[:MAX_CORRELATION_LEN].decode("utf-8", "replace")
    return None
