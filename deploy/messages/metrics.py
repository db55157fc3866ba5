"""``omis.metrics/1``: periodic counters and latencies (``<prefix>/<device>/metrics``, QoS 0)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from deploy.messages.base import Message, Timestamp
from deploy.messages.identifiers import Identifier
from deploy.messages.status import OutboxInfo

METRICS_SCHEMA: Literal["omis.metrics/1"] = "omis.metrics/1"


class MetricsMessage(Message):
    """Counters since boot and recent latencies."""

    schema_: Literal["omis.metrics/1"] = Field(default=METRICS_SCHEMA, alias="schema")
    device_id: Identifier
    boot_id: str = Field(min_length=1, max_length=128)
    at: Timestamp
    counters: dict[str, Annotated[int, Field(ge=0)]]
    latency_ms: dict[str, Annotated[float, Field(ge=0)] | None]
    outbox: OutboxInfo | None = None
