"""The one rule for identifiers: device, slide and scan ids, correlation ids, path components.

The pattern itself is defined in :mod:`firmware_bridge.limits` (the lowest layer, which the
device's CLI and firmware bridge use and which may not import ``deploy``); this module is where
the rest of the product (appliance, archive, OTA, API) takes it from.  Device and archive
accept exactly the same ids: an id the device publishes under is an id the archive stores.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from firmware_bridge.limits import (
    IDENTIFIER_HELP,
    IDENTIFIER_PATTERN,
    IDENTIFIER_RE,
    is_identifier,
)
from firmware_bridge.paths import safe_join  # paths built from ids: firmware_bridge/paths.py

DEVICE_ID_PATTERN = IDENTIFIER_PATTERN
SLIDE_ID_PATTERN = IDENTIFIER_PATTERN
SCAN_ID_PATTERN = IDENTIFIER_PATTERN
MAX_CORRELATION_ID = 128
MESSAGE_ID_PATTERN = r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$"

#: A device, slide or scan id in a pydantic model (needs ``regex_engine="python-re"``: ``\Z``).
Identifier = Annotated[str, Field(pattern=IDENTIFIER_PATTERN, description=IDENTIFIER_HELP)]
MessageId = Annotated[str, Field(pattern=MESSAGE_ID_PATTERN, description="UUID (lower case)")]
CorrelationId = Annotated[str, Field(max_length=MAX_CORRELATION_ID)]

__all__ = [
    "DEVICE_ID_PATTERN",
    "IDENTIFIER_HELP",
    "IDENTIFIER_PATTERN",
    "IDENTIFIER_RE",
    "MAX_CORRELATION_ID",
    "MESSAGE_ID_PATTERN",
    "SCAN_ID_PATTERN",
    "SLIDE_ID_PATTERN",
    "CorrelationId",
    "Identifier",
    "MessageId",
    "is_identifier",
    "safe_join",
    "validate_device_id",
    "validate_identifier",
]


def validate_identifier(value: object, what: str = "id") -> str:
    """``value`` if it is a valid id; else ``ValueError`` with one line naming the rule."""
    if not is_identifier(value):
        raise ValueError(f"{what} {value!r} is not a valid id ({IDENTIFIER_HELP})")
    return str(value)


def validate_device_id(value: object) -> str:
    """``value`` if it is a valid device id (topics, results, the archive); else ``ValueError``."""
    return validate_identifier(value, "device id")
