"""JSON Schemas of every MQTT payload, shipped as package data, and a validator.

``validate("result", payload)`` raises :class:`~deploy.exceptions.SchemaError` naming the first
offending path.  Schema names are the file stems: ``result``, ``status``, ``reply``,
``cmd_scan``, ``cmd_cancel``, ``cmd_status``, ``cmd_ota``, ``metrics``, ``ota_state``,
``availability``, ``receipt``.  Every file is generated from the message models in
:mod:`deploy.messages` (``python -m deploy.messages --write``; a test fails on drift).
Numbers must be finite: NaN and infinity match no ``number`` or ``integer`` type (strict JSON).
"""

from __future__ import annotations

import functools
import json
import math
from importlib import resources
from typing import Any

import jsonschema

from deploy.exceptions import SchemaError

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
    "receipt",
    "shadow",
)


def load_schema(name: str) -> dict[str, Any]:
    """The parsed JSON Schema ``name`` (a copy; safe to modify)."""
    return json.loads(json.dumps(_load(name), allow_nan=False))  # type: ignore[no-any-return]


@functools.cache
def _load(name: str) -> dict[str, Any]:
    if name not in SCHEMA_NAMES:
        raise SchemaError(f"no such schema: {name!r}")
    text = resources.files(__package__).joinpath(f"{name}.json").read_text("utf-8")
    schema: dict[str, Any] = json.loads(text)
    jsonschema.Draft202012Validator.check_schema(schema)
    return schema


def _finite_number(checker: Any, instance: Any) -> bool:
    # JSON has no NaN or infinity: a payload holding one is not JSON, whatever the schema says.
    number: bool = jsonschema.Draft202012Validator.TYPE_CHECKER.is_type(instance, "number")
    return number and math.isfinite(instance)


#: Draft 2020-12 whose ``number`` (and so ``integer``) never matches NaN or infinity.
StrictValidator = jsonschema.validators.extend(  # type: ignore[no-untyped-call]
    jsonschema.Draft202012Validator,
    type_checker=jsonschema.Draft202012Validator.TYPE_CHECKER.redefine("number", _finite_number),
)


@functools.cache
def _validator(name: str) -> Any:
    return StrictValidator(
        _load(name), format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER
    )


def _non_finite_path(value: Any, path: str = "") -> str | None:
    """The path of the first NaN or infinity in ``value``, or None."""
    if isinstance(value, float) and not math.isfinite(value):
        return path
    children: Any = ()
    if isinstance(value, dict):
        children = value.items()
    elif isinstance(value, list | tuple):
        children = enumerate(value)
    for key, child in children:
        found = _non_finite_path(child, f"{path}/{key}" if path else str(key))
        if found is not None:
            return found
    return None


def validate(name: str, payload: Any) -> None:
    """Raise :class:`SchemaError` if ``payload`` does not match schema ``name``.

    A NaN or infinity anywhere fails, also where the schema leaves a value untyped.
    """
    bad = _non_finite_path(payload)
    if bad is not None:
        raise SchemaError(f"{name}: {bad or '(root)'}: non-finite number (not JSON)", path=bad)
    error = jsonschema.exceptions.best_match(_validator(name).iter_errors(payload))
    if error is not None:
        path = "/".join(str(p) for p in error.absolute_path) or "(root)"
        raise SchemaError(f"{name}: {path}: {error.message}", path=path)
