"""Paths built from names a user or a network peer chose: validated, then kept under their base.

Every identifier that reaches a file name (OTA correlation and transfer ids, device and slide
ids, engine cache stems, bundle slots) goes through :func:`safe_join`: each part must match
the one identifier rule (:data:`firmware_bridge.limits.IDENTIFIER_PATTERN`, optionally with a
fixed suffix the caller adds, such as ``.tar``), and the joined path must still resolve inside
``base`` (a second line of defence against a symlink planted in the base directory).
"""

from __future__ import annotations

from pathlib import Path

from firmware_bridge.exceptions import InputError
from firmware_bridge.limits import IDENTIFIER_HELP, is_identifier


def safe_join(base: Path, name: str, suffix: str = "", what: str = "name") -> Path:
    """``base / (name + suffix)``, refusing a ``name`` that is not an identifier or a result
    that leaves ``base``; raises a one-line :class:`InputError` naming ``what``."""
    if not is_identifier(name):
        raise InputError(f"{what} {name!r} cannot name a file ({IDENTIFIER_HELP})")
    if suffix and not is_identifier(f"x{suffix}"):
        raise InputError(f"suffix {suffix!r} cannot end a file name")
    path = base / f"{name}{suffix}"
    root = base.resolve()
    if not path.resolve().is_relative_to(root):
        raise InputError(f"{what} {name!r} leads outside {base}")
    return path
