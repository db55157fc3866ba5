"""Building an ``omis.result/1`` message on the device: the envelope around a slide's report.

The message model itself is :class:`deploy.messages.result.ResultMessage` (one model for device
and archive); the shipped ``deploy/schemas/result.json`` is generated from it by
``python -m deploy.messages --write``.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from deploy.appliance.base import ScanRequest
from deploy.messages.base import rfc3339
from deploy.messages.result import RESULT_SCHEMA, ResultMessage
from inference.result import SlideReport

__all__ = [
    "RESULT_SCHEMA",
    "Identity",
    "ResultMessage",
    "build_result",
    "rfc3339",
]


@dataclass(frozen=True)
class Identity:
    """Who publishes: device and this boot of the process."""

    device_id: str
    boot_id: str


def build_result(
    identity: Identity,
    *,
    seq: int,
    request: ScanRequest,
    started_at: str,
    finished_at: str,
    report: SlideReport,
) -> ResultMessage:
    """The full result; ``message_id`` is new here and stays with the result for ever."""
    return ResultMessage(
        message_id=str(uuid.uuid4()),
        device_id=identity.device_id,
        boot_id=identity.boot_id,
        seq=seq,
        slide_id=request.slide_id,
        scan_id=request.scan_id,
        source=request.source,
        started_at=started_at,
        finished_at=finished_at,
        **dict(report),
    )
