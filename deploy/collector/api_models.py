"""Response models of the collector's HTTP API: what ``/api/openapi.json`` promises.

Models allow extra keys so a newer archive may add fields without breaking older clients;
every key listed here is always present.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class Problem(BaseModel):
    """An error: what went wrong, in one line."""

    detail: str = Field(description="the problem, in one line")


class Me(BaseModel):
    """Who is asking."""

    name: str
    role: str


class ResultSummary(_Open):
    """One archived result: the indexed columns (times RFC 3339 UTC)."""

    message_id: str
    device_id: str
    boot_id: str
    seq: int
    slide_id: str
    scan_id: str
    started_at: str = Field(description="as the device stated it")
    finished_at: str = Field(description="as the device stated it")
    received_at: str = Field(description="the archive's clock when it stored the result")
    device_clock_ahead: bool = Field(
        description="finished_at is later than received_at plus the allowed clock skew; "
        "lists order this result by received_at + skew instead"
    )
    outcome: Literal["classified", "abstained", "failed", "cancelled"]
    outcome_reason: str | None
    outcome_stage: str | None
    review: bool = Field(description="needs a person's review")
    label: str | None
    risk: str | None
    p_high: float | None
    model_name: str | None
    model_version: int | None
    model_sha256: str | None


class ResultPage(BaseModel):
    """One page of results, newest first."""

    total: int = Field(description="results matching the filters")
    limit: int
    offset: int
    items: list[ResultSummary]


class ResultDetail(_Open):
    """One result: the archive's row and the payload exactly as received."""

    archive: ResultSummary
    result: dict[str, Any] = Field(description="the omis.result/1 payload as received")


class Device(_Open):
    """A known device and its live state."""

    device_id: str
    availability: str | None
    availability_at: str | None
    status: dict[str, Any] | None = Field(description="the last omis.status/1 (retained)")
    ota_state: dict[str, Any] | None
    last_result_at: str | None
    updated_at: str | None
    results: int = Field(description="results archived from this device")


class Alert(_Open):
    """An alert, open until ``resolved_at`` is set; a person acknowledges it (``acked_*``)."""

    id: int
    kind: str = Field(
        description="high_risk, seq_gap, seq_reused, offline, rollback, performance or drift"
    )
    device_id: str
    boot_id: str | None
    message_id: str | None
    slide_id: str | None
    seq_from: int | None
    seq_to: int | None
    detail: str
    count: int = Field(description="times raised (a repeat counts, it adds no row)")
    created_at: str
    resolved_at: str | None
    acked_at: str | None
    acked_by: str | None


# Errors are JSON whatever the operation's own media type (CSV, FHIR): spelled out, not "model",
# which FastAPI would document under the route's media type.
_PROBLEM = {"application/json": {"schema": Problem.model_json_schema()}}
UNAUTHORIZED: dict[int | str, dict[str, Any]] = {
    401: {"content": _PROBLEM, "description": "no or wrong credentials"},
    400: {
        "content": {"text/plain": {"schema": {"type": "string"}}},
        "description": "the Host header is not in http.allowed_hosts",
    },
}
NOT_FOUND: dict[int | str, dict[str, Any]] = {
    404: {"content": _PROBLEM, "description": "no result with this message_id"}
}


def problem(status: int, description: str) -> dict[int | str, dict[str, Any]]:
    """An operation's documented error ``status`` (a :class:`Problem` as JSON)."""
    return {status: {"content": _PROBLEM, "description": description}}


class RejectedMessage(_Open):
    """A message the archive could not accept, kept as received (never dropped)."""

    id: int
    received_at: str = Field(description="the archive's clock when it set the message aside")
    topic: str
    device_id: str | None = Field(description="from the topic, when it names one")
    message_id: str | None
    kind: str = Field(description="data, storage or conflict")
    reason: str = Field(description="why, in one line")
    payload_base64: str = Field(description="the bytes exactly as received, base64")
    size: int


class RejectedPage(_Open):
    """One page of rejected messages, newest first, with counts per device."""

    total: int
    limit: int
    offset: int
    items: list[RejectedMessage]
    by_device: dict[str, int] = Field(description="rejected messages per device, all pages")
