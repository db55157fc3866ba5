"""Secrets out of everything printed: error lines, log records, shown configurations.

Two layers: a URL's password (``scheme://user:PASSWORD@host``) is replaced by ``***`` in any
text, and every secret value a configuration loader registered with :func:`register_secret`
(database and broker passwords, key passphrases, also as they appear percent-encoded) is
replaced wherever it shows up.
"""

from __future__ import annotations

import re
import threading
from urllib.parse import quote

MASK = "***"
# scheme://user:password@ -- the password may hold anything but white space and "@" (a
# malformed URL is exactly the one an error message quotes)
_URL_PASSWORD = re.compile(r"(?P<head>\b[A-Za-z][A-Za-z0-9+.-]*://[^\s:/@]*:)(?P<pw>[^\s@]+)@")
_PORT_THEN_PATH = re.compile(r"\d+/")  # http://host:8080/a@b: a port, not a password
_MIN_SECRET = 4  # shorter values would mask ordinary words; such passwords are refused anyway
_secrets: set[str] = set()
_lock = threading.Lock()


def register_secret(value: str | None) -> None:
    """Mask ``value`` (and its percent-encoded form) in everything :func:`redact` sees."""
    if value is None or len(value) < _MIN_SECRET:
        return
    with _lock:
        _secrets.update({value, quote(value, safe="")})


def _mask_password(match: re.Match[str]) -> str:
    if _PORT_THEN_PATH.match(match["pw"]):
        return match[0]
    return f"{match['head']}{MASK}@"


def redact(text: str) -> str:
    """``text`` with URL passwords and registered secrets replaced by ``***``."""
    text = _URL_PASSWORD.sub(_mask_password, text)
    with _lock:
        known = sorted(_secrets, key=len, reverse=True)
    for secret in known:
        text = text.replace(secret, MASK)
    return text
