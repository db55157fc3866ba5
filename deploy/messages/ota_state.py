"""``omis.ota_state/1``: the retained model-store state (``<prefix>/<device>/ota/state``)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from deploy.messages.base import Message
from inference.result import MAX_INT64, ModelRef

OTA_STATE_SCHEMA: Literal["omis.ota_state/1"] = "omis.ota_state/1"


class OtaStateMessage(Message):
    """Current, previous and pending model versions, the last outcome, a running install."""

    schema_: Literal["omis.ota_state/1"] = Field(default=OTA_STATE_SCHEMA, alias="schema")
    current: int | None = Field(ge=0, le=MAX_INT64)
    previous: int | None = Field(ge=0, le=MAX_INT64)
    pending: int | None = Field(ge=0, le=MAX_INT64)
    last_outcome: dict[str, Any] | str | None
    generation: int | None = Field(default=None, ge=0, le=MAX_INT64)
    models: dict[str, dict[str, Any] | None] | None = None
    step: str | None = Field(default=None, max_length=64)
    progress: dict[str, Any] | None = None
    shadow: ModelRef | None = Field(
        default=None, description="the shadow candidate held beside the serving model, or null"
    )
