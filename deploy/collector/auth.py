"""HTTP API accounts: scrypt password hashes, roles ``viewer`` and ``operator``.

A hash reads ``scrypt$<n>$<r>$<p>$<salt b64>$<key b64>`` (``omis collect --hash-password``
prints one).  Requests from localhost need no account unless configured otherwise; every other
request authenticates with HTTP Basic (put TLS in front: a reverse proxy, see docs/collector.md).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
from dataclasses import dataclass

from deploy.collector.config import Account

SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**14, 8, 1
LOCAL_HOSTS = frozenset({"127.0.0.1", "::1", "localhost"})


@dataclass(frozen=True)
class Principal:
    """Who is asking: an account name (``local`` for unauthenticated localhost) and a role."""

    name: str
    role: str


def hash_password(password: str, *, salt: bytes | None = None) -> str:
    """A new scrypt hash of ``password`` with a random salt."""
    salt = salt or os.urandom(16)
    key = hashlib.scrypt(password.encode(), salt=salt, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P)
    b64 = base64.b64encode
    return f"scrypt${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${b64(salt).decode()}${b64(key).decode()}"


def verify_password(password: str, encoded: str) -> bool:
    """True if ``password`` matches ``encoded`` (constant-time comparison)."""
    parts = encoded.split("$")
    if len(parts) != 6 or parts[0] != "scrypt":
        return False
    try:
        n, r, p = int(parts[1]), int(parts[2]), int(parts[3])
        salt, key = base64.b64decode(parts[4]), base64.b64decode(parts[5])
        actual = hashlib.scrypt(
            password.encode(), salt=salt, n=n, r=r, p=p, dklen=len(key), maxmem=2**26
        )
    except ValueError:
        return False
    return hmac.compare_digest(actual, key)


class Accounts:
    """The configured accounts."""

    def __init__(self, accounts: list[Account]) -> None:
        self._by_name = {a.name: a for a in accounts}

    def check(self, name: str, password: str) -> Principal | None:
        """The principal for these credentials, or None."""
        account = self._by_name.get(name)
        if account is None:
            verify_password(password, hash_password("timing", salt=b"0" * 16))  # same cost
            return None
        if not verify_password(password, account.password_hash):
            return None
        return Principal(account.name, account.role)
