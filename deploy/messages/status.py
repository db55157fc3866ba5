"""``omis.status/1``: the retained device status (``<prefix>/<device>/status``)."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import ConfigDict, Field

from deploy.messages.base import Message, Timestamp
from deploy.messages.identifiers import Identifier
from deploy.messages.vocabulary import DeviceState
from inference.result import MAX_INT64

STATUS_SCHEMA: Literal["omis.status/1"] = "omis.status/1"


class ModelSummary(Message):
    """The model serving (name, version, sha256; more keys may follow)."""

    model_config = ConfigDict(extra="allow")

    name: str
    version: int = Field(ge=0, le=MAX_INT64)
    sha256: str


class CurrentScan(Message):
    """The scan running now."""

    scan_id: Identifier
    slide_id: Identifier


class QueueInfo(Message):
    """Scans waiting."""

    depth: int = Field(ge=0)
    capacity: int = Field(ge=1)


class OutboxInfo(Message):
    """The result outbox on disk."""

    rows: int = Field(ge=0)
    bytes: int = Field(ge=0)
    full: bool


class LastError(Message):
    """The latest error the device recorded."""

    code: str = Field(max_length=64)
    message: str = Field(max_length=500)
    at: Timestamp


class StatusMessage(Message):
    """The retained status: state (with reasons when degraded), model, engine, firmware."""

    schema_: Literal["omis.status/1"] = Field(default=STATUS_SCHEMA, alias="schema")
    device_id: Identifier
    state: DeviceState
    reasons: list[str] = Field(default_factory=list)
    boot_id: str = Field(min_length=1, max_length=128)
    app_version: str = Field(max_length=64)
    model: ModelSummary | None
    shadow: ModelSummary | None = Field(
        default=None, description="the shadow candidate held beside the serving model, or null"
    )
    engine: dict[str, Any] | str | None
    firmware: dict[str, Any] | None
    current_scan: CurrentScan | None = None
    queue: QueueInfo | None = None
    outbox: OutboxInfo | None = None
    last_error: LastError | None
    at: Timestamp

    omit_when_none: ClassVar[tuple[str, ...]] = ()
