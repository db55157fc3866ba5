"""Command intake: ``<prefix>/<device>/cmd/<verb>`` -> validated handler -> reply.

Every command gets exactly one reply on ``.../cmd/<verb>/reply`` (``omis.reply/1``) carrying
the request's correlation id: the JSON ``correlation_id`` field if present (MQTT 3.1.1
clients), else the MQTT 5 correlation data; MQTT 5 replies also echo the correlation data as a
property, and an MQTT 5 request's *response topic* under the reply prefix receives a copy of
its reply (:mod:`deploy.requests`).  Errors are replies, never exceptions: ``too_large``,
``too_deep`` (nested deeper than :data:`deploy.requests.MAX_JSON_DEPTH`), ``malformed`` (not
strict JSON or not an object), ``invalid`` (fails the verb's schema), ``unknown_command``,
``wrong_device`` (a ``device_id`` field naming another device), and handler codes (``queue_full``,
``outbox_full``, ``stopping``, ``not_found``, ``unavailable``, ``no_model``, ``internal``;
``cmd/ota`` adds ``rejected`` for a refused offer and ``busy`` while another update runs).
Topics of other devices are never subscribed, so such commands are not seen at all; verbs
longer than :data:`MAX_VERB_LEN` are ignored without a reply.

The router owns the whole reply life cycle.  A handler receives the validated request (a typed
pydantic model when the verb registers one) and returns the reply's ``result``, or a
:class:`~concurrent.futures.Future` of it when the answer comes later (``cmd/ota`` answers once
the bundle has arrived); a handler that raises :class:`CommandFailed` (or a future that fails
with it) answers with that error code.  The reply is serialised once, here.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ValidationError

from deploy.appliance.results import rfc3339
from deploy.exceptions import SchemaError
from deploy.messages.reply import ReplyMessage
from deploy.requests import RequestError, parse_command
from deploy.schemas import validate
from firmware_bridge.validation import first_error

log = logging.getLogger(__name__)

MAX_VERB_LEN = 64
MAX_CORRELATION_LEN = 128

Result = dict[str, Any]
Handler = Callable[[Any], "Result | Future[Result]"]
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
    model: type[BaseModel] | None = None


@dataclass(frozen=True)
class _Pending:
    """A command whose reply waits for its handler's future."""

    verb: str
    request: dict[str, Any]
    correlation: bytes | None
    response_topic: str | None


class CommandRouter:
    """Validates commands against their schemas and dispatches through a table."""

    def __init__(self, device_id: str, max_bytes: int, send_reply: ReplySender) -> None:
        self.device_id = device_id
        self.max_bytes = max_bytes
        self.send_reply = send_reply
        self.counts: dict[str, int] = {}
        self._routes: dict[str, _Route] = {}

    def register(
        self, verb: str, schema: str, handler: Handler, model: type[BaseModel] | None = None
    ) -> None:
        """Route ``verb`` to ``handler`` after validating against schema ``schema`` (and
        parsing into ``model`` when given: the handler then receives the typed request)."""
        self._routes[verb] = _Route(schema, handler, model)

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
        """Handle one command and send its reply; returns the reply, or None when it was
        ignored or will follow (a handler's future).

        ``response_topic`` (MQTT 5) is passed on to the reply sender, which copies the reply there.
        """
        if not verb or len(verb) > MAX_VERB_LEN:
            log.warning("ignoring command with an unusable verb (%d chars)", len(verb))
            return None
        request: dict[str, Any] = {}
        try:
            request = self._parse(payload)
            result = self._dispatch(verb, request)
        except CommandFailed as exc:
            return self._answer(_Pending(verb, request, correlation, response_topic), error=exc)
        pending = _Pending(verb, request, correlation, response_topic)
        if isinstance(result, Future):
            result.add_done_callback(lambda done: self._settle(pending, done))
            return None
        return self._answer(pending, result=result)

    def _settle(self, pending: _Pending, done: Future[Result]) -> None:
        error = done.exception()
        if error is None:
            self._answer(pending, result=done.result())
        elif isinstance(error, CommandFailed):
            self._answer(pending, error=error)
        else:
            log.error("command %s failed late: %s", pending.verb, error)
            internal = CommandFailed("internal", f"{type(error).__name__}: {error}")
            self._answer(pending, error=internal)

    def _answer(
        self,
        pending: _Pending,
        result: Result | None = None,
        error: CommandFailed | None = None,
    ) -> dict[str, Any]:
        if error is None:
            reply = self._reply(pending.verb, pending.request, pending.correlation, result=result)
        else:
            self.counts[error.code] = self.counts.get(error.code, 0) + 1
            log.info("command %s refused: %s: %s", pending.verb, error.code, error)
            detail = {"code": error.code, "message": str(error)[:500]}
            reply = self._reply(pending.verb, pending.request, pending.correlation, error=detail)
        body = json.dumps(reply, allow_nan=False).encode("utf-8")
        self.send_reply(pending.verb, body, pending.correlation, pending.response_topic)
        return reply

    def _parse(self, payload: bytes) -> dict[str, Any]:
        try:  # size, depth and strict JSON, bounded before parsing (deploy.requests)
            return parse_command(payload, self.max_bytes)
        except RequestError as exc:
            raise CommandFailed(exc.code, str(exc)) from exc

    def _dispatch(self, verb: str, request: dict[str, Any]) -> Result | Future[Result]:
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
        typed: Any = request
        if route.model is not None:
            try:
                typed = route.model.model_validate(request)
            except ValidationError as exc:
                raise CommandFailed("invalid", f"{verb}: {first_error(exc)}") from exc
        try:
            return route.handler(typed)
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
        return ReplyMessage.model_validate(
            {
                "device_id": self.device_id,
                "verb": verb,
                "correlation_id": _correlation_id(request, correlation),
                "ok": error is None,
                "result": (result or {}) if error is None else None,
                "error": error,
                "at": rfc3339(),
            }
        ).to_json()


def _correlation_id(request: dict[str, Any], correlation: bytes | None) -> str | None:
    value = request.get("correlation_id")
    if isinstance(value, str):
        return value[:MAX_CORRELATION_LEN]
    if correlation:
        return correlation[:MAX_CORRELATION_LEN].decode("utf-8", "replace")
    return None
