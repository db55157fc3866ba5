"""Documented bounds on everything a user or a network peer can name or size.

One definition per kind of input, used by every edge that accepts it: the CLI, the MQTT JSON
Schemas (``deploy/schemas/*.json`` carry :data:`IDENTIFIER_PATTERN` verbatim; a test keeps
them equal), the configuration models and the simulator.  The numbers are documented in
``docs/security.md``; counts are checked before anything is allocated.
"""

from __future__ import annotations

import re

from firmware_bridge.exceptions import InputError

# Slide, scan and device ids.  ``\Z`` (not ``$``, which also matches before a final newline):
# "A1\n" is not an id.  JSON Schema "pattern" is evaluated with Python's ``re`` here.
IDENTIFIER_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z"
IDENTIFIER_RE = re.compile(IDENTIFIER_PATTERN)
IDENTIFIER_HELP = "1-64 characters: letters, digits, '.', '_', '-'; starting with a letter or digit"

MAX_SLIDES = 100_000
MAX_FIELDS = 1_000
MAX_EPOCHS = 10_000
MAX_FOLDS = 100


def is_identifier(value: object) -> bool:
    """True when ``value`` is a string matching :data:`IDENTIFIER_PATTERN`."""
    return isinstance(value, str) and IDENTIFIER_RE.match(value) is not None


def check_identifier(value: object, what: str) -> str:
    """Return ``value`` if it is a valid identifier; else raise a one-line :class:`InputError`."""
    if not is_identifier(value):
        raise InputError(f"{what} {value!r} is not a valid id ({IDENTIFIER_HELP})")
    return str(value)


def check_count(value: int, what: str, maximum: int, minimum: int = 1) -> int:
    """Return ``value`` if ``minimum <= value <= maximum``; else a one-line :class:`InputError`."""
    if value < minimum:
        raise InputError(f"{what} must be >= {minimum}, got {value}")
    if value > maximum:
        raise InputError(f"{what} must be <= {maximum:,}, got {value:,}")
    return value
