"""Command payloads (``<prefix>/<device>/cmd/<verb>``); ``cmd/ota`` is
:class:`deploy.ota.delivery.OtaOffer`."""

from __future__ import annotations

from pydantic import Field

from deploy.messages.base import Message
from deploy.messages.identifiers import CorrelationId, Identifier

PLAN_PATTERN = r"^[A-Za-z0-9._-]+$"


class _Command(Message):
    correlation_id: CorrelationId | None = None
    device_id: Identifier | None = Field(
        default=None, description="when given, must name this device (else wrong_device)"
    )


class ScanCommand(_Command):
    """cmd/scan - start a scan (queued; one at a time)."""

    slide_id: Identifier
    fields: int | None = Field(default=None, ge=1, le=1000)
    plan: str | None = Field(default=None, max_length=64, pattern=PLAN_PATTERN)


class CancelCommand(_Command):
    """cmd/cancel - cancel a queued or running scan (the running one when scan_id is absent)."""

    scan_id: Identifier | None = None


class StatusCommand(_Command):
    """cmd/status - republish the retained status and return it in the reply."""
