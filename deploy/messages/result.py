"""``omis.result/1``: the outcome of one slide, the envelope around a :class:`SlideReport`.

The device builds it (:func:`deploy.appliance.results.build_result`), the archive parses it with
:func:`parse_result` (older payloads upgraded first by :mod:`deploy.messages.migrations`), and
``deploy/schemas/result.json`` is generated from it.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import ConfigDict, Field

from deploy.messages.base import Timestamp
from deploy.messages.identifiers import Identifier, MessageId
from inference.result import MAX_INT64, SlideReport, Text, strict_json

RESULT_SCHEMA: Literal["omis.result/1"] = "omis.result/1"
#: The revision of the payload within ``omis.result/1`` that this app writes (see migrations).
RESULT_FORMAT: Literal[3] = 3
OMIT_WHEN_NONE = ("reason", "reason_text", "stage", "firmware", "simulation", "recipe")
PREDICTION_OMIT_WHEN_NONE = ("p_high", "argmax_label", "decision", "side", "band")


class ResultMessage(SlideReport):
    """One ``omis.result/1`` message: who, which slide, when, and the slide's report."""

    model_config = ConfigDict(regex_engine="python-re")
    omit_when_none: ClassVar[tuple[str, ...]] = OMIT_WHEN_NONE

    schema_: Literal["omis.result/1"] = Field(default=RESULT_SCHEMA, alias="schema")
    format: Literal[3] = Field(
        default=RESULT_FORMAT,
        description="payload revision within omis.result/1; older ones are upgraded on receipt",
    )
    message_id: MessageId = Field(description="UUID, stable across redelivery")
    device_id: Identifier
    boot_id: Text = Field(min_length=1, max_length=128)
    seq: int = Field(ge=1, le=MAX_INT64, strict=True, description="per-boot sequence number")
    slide_id: Identifier
    scan_id: Identifier
    source: Literal["cli", "mqtt", "firmware"]
    started_at: Timestamp
    finished_at: Timestamp

    def to_json(self) -> dict[str, Any]:
        """The message as JSON data; optional keys that are not set are left out."""
        data = self.model_dump(mode="json", by_alias=True)
        for key in OMIT_WHEN_NONE:
            if data.get(key) is None:
                data.pop(key, None)
        for key in PREDICTION_OMIT_WHEN_NONE:
            if data["prediction"].get(key) is None:
                data["prediction"].pop(key, None)
        return data

    def payload(self) -> bytes:
        """The strict-JSON bytes published (no NaN or infinity can get through)."""
        return strict_json(self.to_json())


def parse_result(data: Any) -> ResultMessage:
    """A received result, upgraded from older formats and validated.

    Raises ``ValueError`` (pydantic's ``ValidationError`` is one) naming the first problem.
    """
    from deploy.messages.migrations import upgrade_result

    return ResultMessage.model_validate(upgrade_result(data))
