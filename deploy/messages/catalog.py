"""Every shipped JSON Schema, generated from the message models.

``python -m deploy.messages --write`` rewrites ``deploy/schemas/*.json``; ``--check`` (and a
test) fails when a shipped file differs from what the models generate.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from deploy.messages.availability import Availability
from deploy.messages.base import SCHEMA_BASE
from deploy.messages.commands import CancelCommand, ScanCommand, StatusCommand
from deploy.messages.metrics import MetricsMessage
from deploy.messages.ota_state import OtaStateMessage
from deploy.messages.receipt import ReceiptMessage
from deploy.messages.reply import ReplyMessage
from deploy.messages.result import ResultMessage
from deploy.messages.shadow import ShadowMessage
from deploy.messages.status import StatusMessage

SCHEMA_DIR = Path(__file__).resolve().parents[1] / "schemas"
DRAFT = "https://json-schema.org/draft/2020-12/schema"
COMMENT = (
    "Generated from {source} by `python -m deploy.messages --write`; do not edit. "
    "Numbers are finite (RFC 8259 JSON has no NaN or Infinity)."
)


@dataclass(frozen=True)
class Entry:
    """One shipped schema: its file stem, ``$id``, title and how to generate it."""

    name: str
    schema_id: str
    title: str
    generate: Callable[[], dict[str, Any]]
    source: str
    complete: bool = False  # the generator writes the whole document ($schema, $id, title)


def _model_schema(model: type[BaseModel], enveloped: bool = True) -> Callable[[], dict[str, Any]]:
    def generate() -> dict[str, Any]:
        schema = model.model_json_schema(by_alias=True)
        if enveloped:  # "schema" has a default but is always written: required on the wire
            schema["required"] = ["schema", *schema.get("required", [])]
        return schema

    return generate


def _reply_schema() -> dict[str, Any]:
    schema = _model_schema(ReplyMessage)()
    schema["oneOf"] = [{"required": ["result"]}, {"required": ["error"]}]
    return schema


def _offer_schema() -> dict[str, Any]:
    # The OTA offer model lives with the OTA code; imported here, lazily, to keep that code free
    # to use this package's identifiers without an import cycle.
    from deploy.appliance.ota_transfer import offer_json_schema

    return offer_json_schema()


def _id(name: str) -> str:
    return SCHEMA_BASE + name


ENTRIES: tuple[Entry, ...] = (
    Entry(
        "result",
        _id("omis.result/1"),
        "omis.result/1 - the outcome of one slide",
        _model_schema(ResultMessage),
        "deploy.messages.result.ResultMessage",
    ),
    Entry(
        "status",
        _id("omis.status/1"),
        "omis.status/1 - retained device status",
        _model_schema(StatusMessage),
        "deploy.messages.status.StatusMessage",
    ),
    Entry(
        "reply",
        _id("omis.reply/1"),
        "omis.reply/1 - answer to a command on .../cmd/<verb>/reply",
        _reply_schema,
        "deploy.messages.reply.ReplyMessage",
    ),
    Entry(
        "cmd_scan",
        _id("omis.cmd.scan/1"),
        "cmd/scan - start a scan (queued; one at a time)",
        _model_schema(ScanCommand, enveloped=False),
        "deploy.messages.commands.ScanCommand",
    ),
    Entry(
        "cmd_cancel",
        _id("omis.cmd.cancel/1"),
        "cmd/cancel - cancel a queued or running scan (the running one when scan_id is absent)",
        _model_schema(CancelCommand, enveloped=False),
        "deploy.messages.commands.CancelCommand",
    ),
    Entry(
        "cmd_status",
        _id("omis.cmd.status/1"),
        "cmd/status - republish the retained status and return it in the reply",
        _model_schema(StatusCommand, enveloped=False),
        "deploy.messages.commands.StatusCommand",
    ),
    Entry(
        "cmd_ota",
        _id("omis.ota_offer/1"),
        "cmd/ota - omis.ota_offer/1, a signed model offer (deploy.ota.delivery.OtaOffer)",
        _offer_schema,
        "deploy.ota.delivery.OtaOffer",
        complete=True,
    ),
    Entry(
        "metrics",
        _id("omis.metrics/1"),
        "omis.metrics/1 - periodic counters and latencies (QoS 0)",
        _model_schema(MetricsMessage),
        "deploy.messages.metrics.MetricsMessage",
    ),
    Entry(
        "ota_state",
        _id("omis.ota_state/1"),
        "omis.ota_state/1 - retained model store state (published by the OTA component)",
        _model_schema(OtaStateMessage),
        "deploy.messages.ota_state.OtaStateMessage",
    ),
    Entry(
        "availability",
        _id("omis.availability/1"),
        "availability - plain UTF-8 text (not JSON); this schema describes the decoded string",
        _model_schema(Availability, enveloped=False),
        "deploy.messages.availability.Availability",
    ),
    Entry(
        "receipt",
        _id("omis.receipt/1"),
        "omis.receipt/1 - the archive's receipt for stored message ids (archive -> device)",
        _model_schema(ReceiptMessage),
        "deploy.messages.receipt.ReceiptMessage",
    ),
    Entry(
        "shadow",
        _id("omis.shadow/1"),
        "omis.shadow/1 - a shadow candidate's call on one slide (never a clinical result)",
        _model_schema(ShadowMessage),
        "deploy.messages.shadow.ShadowMessage",
    ),
)

SCHEMA_NAMES: tuple[str, ...] = tuple(e.name for e in ENTRIES)


def json_schema(name: str) -> dict[str, Any]:
    """The generated JSON Schema ``name`` (a file stem of ``deploy/schemas``)."""
    entry = next((e for e in ENTRIES if e.name == name), None)
    if entry is None:
        raise KeyError(f"no such schema: {name!r} (known: {', '.join(SCHEMA_NAMES)})")
    body = entry.generate()
    if entry.complete:
        return body
    return {
        "$schema": DRAFT,
        "$id": entry.schema_id,
        "title": entry.title,
        "$comment": COMMENT.format(source=entry.source),
        **{k: v for k, v in body.items() if k not in ("title", "description", "$schema", "$id")},
    }


def render(name: str) -> str:
    """The exact text of ``deploy/schemas/<name>.json``."""
    return json.dumps(json_schema(name), indent=2, allow_nan=False) + "\n"


def drifted() -> list[str]:
    """The shipped schema files that differ from the models (empty when all agree)."""
    return [
        e.name
        for e in ENTRIES
        if not (SCHEMA_DIR / f"{e.name}.json").is_file()
        or (SCHEMA_DIR / f"{e.name}.json").read_text("utf-8") != render(e.name)
    ]


def write_all() -> list[Path]:
    """Rewrite every shipped schema (atomically, file by file); returns the paths written."""
    written = []
    for entry in ENTRIES:
        path = SCHEMA_DIR / f"{entry.name}.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(render(entry.name), "utf-8")
        tmp.replace(path)
        written.append(path)
    return written
