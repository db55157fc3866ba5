"""The ``omis.result/1`` envelope around a scanner's result body."""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from deploy.appliance.base import ScanRequest

RESULT_SCHEMA = "omis.result/1"
BODY_KEYS = ("model", "backend", "prediction", "fields", "spectrum", "timings_ms")
OPTIONAL_KEYS = ("simulation", "firmware")


def rfc3339(ts: dt.datetime | None = None) -> str:
    """UTC time as RFC 3339 with a ``Z`` suffix and milliseconds."""
    utc = dt.timezone.utc
    when = (ts or dt.datetime.now(utc)).astimezone(utc)
    return when.isoformat(timespec="milliseconds").replace("+00:00", "Z")


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
    body: Mapping[str, Any],
) -> dict[str, Any]:
    """The full result; ``message_id`` is new here and stays with the result for ever."""
    result: dict[str, Any] = {
        "schema": RESULT_SCHEMA,
        "message_id": str(uuid.uuid4()),
        "device_id": identity.device_id,
        "boot_id": identity.boot_id,
        "seq": seq,
        "slide_id": request.slide_id,
        "scan_id": request.scan_id,
        "source": request.source,
        "started_at": started_at,
        "finished_at": finished_at,
    }
    for key in BODY_KEYS:
        result[key] = body.get(key)
    for key in OPTIONAL_KEYS:
        if body.get(key) is not None:
            result[key] = body[key]
    return result
