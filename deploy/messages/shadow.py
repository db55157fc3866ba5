"""``omis.shadow/1``: a shadow candidate's outcome on one slide (``<prefix>/<device>/shadow``).

A device holding a candidate bundle in shadow mode classifies every slide's spectrum a second
time with it (same acquisition, same spectrum) and publishes this message beside the serving
``omis.result/1``.  It never reaches the worklist, alerts or FHIR: the archive keeps it in its
own table for the comparison (``GET /api/shadow``).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from deploy.messages.base import Message, Timestamp
from deploy.messages.identifiers import Identifier, MessageId
from deploy.messages.result import PREDICTION_OMIT_WHEN_NONE
from inference.result import MAX_INT64, ModelRef, Prediction, Text

SHADOW_SCHEMA: Literal["omis.shadow/1"] = "omis.shadow/1"


class ShadowMessage(Message):
    """The candidate's call on one slide, linked to the serving result of the same slide."""

    omit_when_none = ("reason",)

    schema_: Literal["omis.shadow/1"] = Field(default=SHADOW_SCHEMA, alias="schema")
    message_id: MessageId = Field(description="UUID of this shadow message")
    serving_message_id: MessageId = Field(
        description="message_id of the omis.result/1 of the same slide (the serving call)"
    )
    device_id: Identifier
    slide_id: Identifier
    scan_id: Identifier
    finished_at: Timestamp
    candidate: ModelRef = Field(description="the shadow model (name, version, sha256)")
    serving: ModelRef = Field(description="the model that served the slide")
    outcome: Literal["classified", "abstained", "failed"] = Field(
        description="the candidate's outcome, by the candidate's own thresholds (failed: the "
        "candidate raised on this slide's spectrum; the serving result is unaffected)"
    )
    reason: Text | None = Field(
        default=None, max_length=512, description="why abstained (code) or failed (one line)"
    )
    prediction: Prediction | None = Field(description="the candidate's call (None when failed)")
    serving_outcome: Literal["classified", "abstained"]
    serving_label: Text | None = Field(max_length=64, description="the serving decision")
    timings_ms: dict[str, float] = Field(
        description="the candidate's render/preprocess/infer times (the shadow's cost)"
    )
    seq: int = Field(ge=1, le=MAX_INT64, strict=True, description="per-boot sequence number")

    def to_json(self) -> dict[str, Any]:
        """The message as JSON data; the prediction written as in ``omis.result/1``."""
        data = super().to_json()
        prediction = data.get("prediction")
        if prediction is not None:
            for key in PREDICTION_OMIT_WHEN_NONE:
                if prediction.get(key) is None:
                    prediction.pop(key, None)
        return data
