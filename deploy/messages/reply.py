"""``omis.reply/1``: the answer to a command, on ``<prefix>/<device>/cmd/<verb>/reply``."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field, model_validator

from deploy.messages.base import Message, Timestamp
from deploy.messages.identifiers import Identifier
from deploy.messages.vocabulary import ReplyCode

REPLY_SCHEMA: Literal["omis.reply/1"] = "omis.reply/1"


class ReplyError(Message):
    """Why a command was refused."""

    code: ReplyCode
    message: str = Field(max_length=1000)


class ReplyMessage(Message):
    """Exactly one of ``result`` (ok) and ``error`` (refused)."""

    schema_: Literal["omis.reply/1"] = Field(default=REPLY_SCHEMA, alias="schema")
    device_id: Identifier
    verb: str = Field(min_length=1, max_length=64)
    correlation_id: str | None = Field(max_length=128)
    ok: bool
    result: dict[str, Any] | None = None
    error: ReplyError | None = None
    at: Timestamp

    omit_when_none: ClassVar[tuple[str, ...]] = ("result", "error")

    @model_validator(mode="after")
    def _one_answer(self) -> ReplyMessage:
        if (self.result is None) == (self.error is None) or self.ok != (self.error is None):
            raise ValueError("a reply has a result (ok) or an error (not ok), never both")
        return self
