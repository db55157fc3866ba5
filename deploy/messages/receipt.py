"""``omis.receipt/1``: the archive's confirmation, back to the device, of what it kept.

Topic ``<prefix>/<device>/receipt`` (archive -> device, QoS 1, not retained).  The archive
publishes one receipt per batch it committed, naming every ``message_id`` of that device it now
holds: stored (or already stored, a redelivery), or set aside in its rejected-messages table
(``rejected``, with the reason; the bytes are kept there) -- a conflicting second copy of a
stored ``message_id`` included (reason ``conflict: ...``).  The device
deletes a result from its outbox only when a receipt names it; until then it resends the result
after a timeout (the broker's PUBACK only marks it "sent").
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from deploy.messages.base import Message, Timestamp
from deploy.messages.identifiers import MessageId

RECEIPT_SCHEMA: Literal["omis.receipt/1"] = "omis.receipt/1"
MAX_RECEIPT_IDS = 1000  # per receipt; a larger batch is split into several receipts


class RejectedId(Message):
    """A message the archive could not accept as a result; its bytes are in the rejected table."""

    message_id: MessageId
    reason: str = Field(max_length=500)


class ReceiptMessage(Message):
    """The message ids one archive instance holds now, from one device."""

    schema_: Literal["omis.receipt/1"] = Field(default=RECEIPT_SCHEMA, alias="schema")
    message_ids: list[MessageId] = Field(
        default_factory=list,
        max_length=MAX_RECEIPT_IDS,
        description="stored (or stored before, a redelivery): delete from the outbox",
    )
    rejected: list[RejectedId] = Field(
        default_factory=list,
        max_length=MAX_RECEIPT_IDS,
        description="set aside in the rejected-messages table (a conflicting copy too): "
        "delete, and do not resend",
    )
    collector: str = Field(min_length=1, max_length=128, description="archive instance id")
    at: Timestamp

    @model_validator(mode="after")
    def _not_empty(self) -> ReceiptMessage:
        if not self.message_ids and not self.rejected:
            raise ValueError("a receipt names at least one message id")
        return self


def receipt_topic(prefix: str, device_id: str) -> str:
    """``<prefix>/<device>/receipt``."""
    return f"{prefix}/{device_id}/receipt"
