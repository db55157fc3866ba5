"""JSON Schemas of every MQTT payload, shipped as package data, and a validator.

``validate("result", payload)`` raises :class:`~deploy.exceptions.SchemaError` naming the first
offending path.  Schema names are the file stems: ``result``, ``status``, ``reply``,
``cmd_scan``, ``cmd_cancel``, ``cmd_status``, ``metrics``, ``ota_state``, ``availability``.
"""

from __future__ import annotations

import functools
import json
from importlib import resources
from typing import Any

import jsonschema

from deploy.exceptions import SchemaError
from inference.result import is_finite_json

SCHEMA_NAMES = (
    "result",
    "status",
    "reply",
    "cmd_scan",
    "cmd_cancel",
    "cmd_status",
    "cmd_ota",
    "metrics",
    "ota_state",
    "availability",
)


def load_schema(name: str) -> dict[str, Any]:
    """The parsed JSON Schema ``name`` (a copy; safe to modify)."""
    return json.loads(json.dumps(_load(name)))  # type: ignore[no-any-return]


@functools.cache
def _load(name: str) -> dict[str, Any]:
    if name not in SCHEMA_NAMES:
        raise SchemaError(f"no such schema: {name!r}")
    text = resources.files(__package__).joinpath(f"{name}.json").read_text("utf-8")
    schema: dict[str, Any] = json.loads(text)
    jsonschema.Draft202012Validator.check_schema(schema)
    return schema


@functools.cache
def _validator(name: str) -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator(
        _load(name), format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER
    )


def validate(name: str, payload: Any) -> None:
    """Raise :class:`SchemaError` if ``payload`` does not match schema ``name``.

    Payloads are strict JSON: a NaN or infinity anywhere is an error, whatever the schema says.
    """
    if not is_finite_json(payload):
        raise SchemaError(f"{name}: (root): holds a non-finite number (NaN or Infinity)")
    error = jsonschema.exceptions.best_match(_validator(name).iter_errors(payload))
    if error is not None:
        path = "/".join(str(p) for p in error.absolute_path) or "(root)"
        raise SchemaError(f"{name}: {path}: {error.message}", path=path)
