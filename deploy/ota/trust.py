"""The device's trust store: the Ed25519 public keys whose signatures it accepts.

Layout: ``<state-dir>/trust/<fingerprint>.pub`` (PEM), one file per key.  Several keys can be
trusted at once, which is how keys rotate: trust the new key, sign new bundles with it, then
remove the old key (see ``docs/ota.md``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from deploy.ota.exceptions import TrustError
from deploy.ota.signing import fingerprint, load_public_key, public_pem
from firmware_bridge.fsutil import atomic_write_bytes

log = logging.getLogger(__name__)

TRUST_DIR = "trust"
MIN_PREFIX = 8


@dataclass(frozen=True)
class TrustedKey:
    """One trusted public key."""

    fingerprint: str
    path: Path


class TrustStore:
    """Trusted public keys under ``<state_dir>/trust``."""

    def __init__(self, state_dir: Path) -> None:
        self.root = Path(state_dir) / TRUST_DIR

    def add(self, pub_path: Path) -> str:
        """Trust the public key in ``pub_path``; returns its fingerprint (idempotent)."""
        key = load_public_key(pub_path)
        fp = fingerprint(key)
        target = self.root / f"{fp}.pub"
        if not target.exists():
            atomic_write_bytes(target, public_pem(key))
            log.info("trusted key %s", fp)
        return fp

    def list(self) -> list[TrustedKey]:
        """Every trusted key, sorted by fingerprint."""
        if not self.root.is_dir():
            return []
        return [TrustedKey(p.stem, p) for p in sorted(self.root.glob("*.pub"))]

    def keys(self) -> dict[str, Ed25519PublicKey]:
        """Fingerprint -> public key, for signature verification."""
        out: dict[str, Ed25519PublicKey] = {}
        for entry in self.list():
            key = load_public_key(entry.path)
            if fingerprint(key) != entry.fingerprint:
                # A renamed or edited key file is not the key that was trusted.
                raise TrustError(f"{entry.path}: content does not match its fingerprint name")
            out[entry.fingerprint] = key
        return out

    def find(self, prefix: str) -> TrustedKey:
        """The one trusted key whose fingerprint starts with ``prefix`` (>= 8 hex digits)."""
        prefix = prefix.strip().lower()
        if len(prefix) < MIN_PREFIX:
            raise TrustError(f"fingerprint prefix {prefix!r} too short (need {MIN_PREFIX}+)")
        hits = [k for k in self.list() if k.fingerprint.startswith(prefix)]
        if not hits:
            raise TrustError(f"no trusted key with fingerprint {prefix}")
        if len(hits) > 1:
            raise TrustError(f"fingerprint prefix {prefix} is ambiguous ({len(hits)} keys)")
        return hits[0]

    def remove(self, prefix: str) -> str:
        """Stop trusting a key; returns its full fingerprint."""
        entry = self.find(prefix)
        entry.path.unlink()
        remaining = len(self.list())
        if remaining == 0:
            log.warning("trust store is now empty: no bundle can be installed until a key is added")
        log.info("removed trusted key %s (%d left)", entry.fingerprint, remaining)
        return entry.fingerprint
