"""Scan and cancel through the archive (docs/collector.md "Commands"): operators and above.

``POST /api/devices/{device_id}/scan`` and ``.../cancel`` publish ``cmd/scan`` /
``cmd/cancel`` (:mod:`deploy.messages.commands`) over the archive's own MQTT session, wait a few
seconds for the device's reply (by correlation id) and return it.  Every attempt is audited
(user, role, client, device, the command sent, the reply's code) - also one that got no reply
(504) or could not be sent (503); a refused request (role, CSRF, body, unknown device) sends and
records nothing.
"""

import logging
import uuid
from dataclasses import dataclass
from typing import Annotated, Any, Protocol

from fastapi import APIRouter, HTTPException, Request
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import Engine, select

from deploy.collector.audit import Actor, record_now
from deploy.collector.auth import Principal
from deploy.collector.http_params import ID_CHARS, text_path
from deploy.collector.tables import devices
from deploy.exceptions import MqttError
from deploy.messages.commands import PLAN_PATTERN, CancelCommand, ScanCommand
from deploy.messages.identifiers import Identifier

log = logging.getLogger(__name__)

DeviceId = Annotated[str, text_path(ID_CHARS, "the device's id")]
RESPONSES: dict[int | str, dict[str, Any]] = {
    404: {"description": "no such device in the archive"},
    503: {"description": "the archive has no MQTT connection: nothing was sent"},
    504: {"description": "no reply from the device in time (offline?); the attempt is audited"},
}


class CommandSender(Protocol):
    """What sends a command and waits for its reply (:class:`~deploy.collector.ingest.
    ArchiveSubscriber`)."""

    def command(
        self, device: str, verb: str, body: dict[str, Any], timeout_s: float
    ) -> dict[str, Any] | None:
        """Publish ``body`` on ``cmd/<verb>`` of ``device``; its reply, or None in time."""


class _Body(BaseModel):
    # correlation_id and device_id are the archive's to set, so they are unknown fields here
    model_config = ConfigDict(extra="forbid", regex_engine="python-re")


class ScanBody(_Body):
    """``POST /api/devices/{device_id}/scan``: the ``cmd/scan`` fields a person chooses."""

    slide_id: Identifier
    fields: int | None = Field(default=None, ge=1, le=1000)
    plan: str | None = Field(default=None, max_length=64, pattern=PLAN_PATTERN)


class CancelBody(_Body):
    """``POST /api/devices/{device_id}/cancel``: ``scan_id``, or the running scan when absent."""

    scan_id: Identifier | None = None


def _known(engine: Engine, device: str) -> None:
    with engine.connect() as conn:
        found = conn.execute(select(devices.c.device_id).where(devices.c.device_id == device))
        if found.first() is None:
            raise HTTPException(404, f"no device {device!r} in the archive")


@dataclass(frozen=True)
class Commands:
    """Where commands go (``sender``), where they are audited (``engine``), how long to wait."""

    sender: CommandSender | None
    engine: Engine
    timeout_s: float

    def send(self, actor: Actor, command: ScanCommand | CancelCommand, verb: str) -> dict[str, Any]:
        """Send, wait, audit; the device's reply (503/504 when there is none)."""
        device = str(command.device_id)
        body = command.to_json()
        reply: dict[str, Any] | None = None
        code, problem = "not_sent", None
        try:
            if self.sender is None:
                raise MqttError("this archive runs without an MQTT connection")
            reply = self.sender.command(device, verb, body, self.timeout_s)
            code = "no_reply" if reply is None else _code(reply)
        except MqttError as exc:
            problem = str(exc)
        detail = {"command": body, "reply": code}
        record_now(self.engine, actor, f"command.{verb}", device, detail)
        if problem is not None:
            log.warning("cmd/%s for %s not sent: %s", verb, device, problem)
            raise HTTPException(503, f"{verb} not sent: {problem}")
        if reply is None:
            raise HTTPException(
                504, f"no reply from {device} within {self.timeout_s:g} s (offline?)"
            )
        return reply


def _code(reply: dict[str, Any]) -> str:
    """``ok``, or the error code of a refusal (``?`` when the reply names none)."""
    if reply.get("ok") is True:
        return "ok"
    error = reply.get("error")
    code = error.get("code") if isinstance(error, dict) else None
    return code[:64] if isinstance(code, str) else "?"


def add_command_routes(router: APIRouter, operator: Any, commands: Commands) -> None:
    """The two routes on ``router`` (``operator``: the role dependency)."""
    engine = commands.engine

    def actor(who: Principal, request: Request) -> Actor:
        return Actor(who.name, who.role, request.client.host if request.client else "?")

    @router.post(
        "/api/devices/{device_id}/scan",
        summary="start a scan on a device (cmd/scan); the device's reply",
        responses=RESPONSES,
    )
    def scan(
        *,
        device_id: DeviceId,
        body: ScanBody,
        who: Annotated[Principal, operator],
        request: Request,
    ) -> dict[str, Any]:
        _known(engine, device_id)
        command = ScanCommand(
            **body.model_dump(), device_id=device_id, correlation_id=_correlation()
        )
        return commands.send(actor(who, request), command, "scan")

    @router.post(
        "/api/devices/{device_id}/cancel",
        summary="cancel a queued or the running scan (cmd/cancel); the device's reply",
        responses=RESPONSES,
    )
    def cancel(
        *,
        device_id: DeviceId,
        who: Annotated[Principal, operator],
        request: Request,
        body: CancelBody | None = None,
    ) -> dict[str, Any]:
        _known(engine, device_id)
        scan_id = None if body is None else body.scan_id
        command = CancelCommand(scan_id=scan_id, device_id=device_id, correlation_id=_correlation())
        return commands.send(actor(who, request), command, "cancel")


def _correlation() -> str:
    return f"archive-{uuid.uuid4()}"
