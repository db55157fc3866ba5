"""Who is asking: archive users (argon2id), sessions with CSRF tokens, API tokens, HTTP Basic.

* Users live in the archive database (:class:`UserStore`; ``omis collect user ...``), each
  with a role: ``viewer`` < ``operator`` < ``cytotech`` < ``pathologist`` < ``admin``.
  The old ``http.accounts`` (scrypt hashes in the YAML) keep working as viewer/operator.
* Password hashes are argon2id (OWASP's parameters: 19 MiB, t=2, p=1): memory-hard, so a
  stolen database is slow to guess from.
* Refusal takes the same time for unknown, disabled and known users (a dummy hash of the same
  cost is checked), failed attempts are limited per client, and at most ``kdf_concurrency``
  hashes run at once, so the KDF is no lever for a denial of service (:class:`Authenticator`).
* Sessions and API tokens are random 256-bit secrets stored as SHA-256 digests; they never run
  the KDF.  A cookie session must send its CSRF token on every write.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import logging
import os
import re
import secrets
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import argon2
from sqlalchemy import Engine, insert, select, update
from sqlalchemy.exc import IntegrityError

from deploy.collector.audit import Actor, record
from deploy.collector.config import Account
from deploy.collector.store import utcnow
from deploy.collector.tables import api_tokens, sessions, users
from deploy.exceptions import ArchiveError

log = logging.getLogger(__name__)

ROLES = ("viewer", "operator", "cytotech", "pathologist", "admin")
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**14, 8, 1
LOCAL_HOSTS = frozenset({"127.0.0.1", "::1", "localhost"})
NAME_PATTERN = r"^[A-Za-z0-9_.@-]{1,64}$"
_NAME = re.compile(NAME_PATTERN)
TOKEN_PREFIX = "omis_"  # noqa: S105 (a prefix that marks tokens in logs, not a secret)
# argon2id with OWASP's minimum (Password Storage Cheat Sheet): 19 MiB, t=2, p=1.  Memory-hard
# enough that a GPU guesses slowly, cheap enough (~50 ms) that logins stay quick on a small box.
_HASHER = argon2.PasswordHasher(time_cost=2, memory_cost=19456, parallelism=1)


def rank(role: str) -> int:
    """The role's place in ``ROLES`` (-1 for an unknown role: below everything)."""
    return ROLES.index(role) if role in ROLES else -1


@dataclass(frozen=True)
class Principal:
    """Who is asking: name, role, and how (``session``, ``basic``, ``token``, ``local``)."""

    name: str
    role: str
    via: str = "basic"
    csrf: str | None = None  # the session's CSRF token (cookie sessions only)

    def at_least(self, role: str) -> bool:
        """True when this principal's role is ``role`` or above."""
        return rank(self.role) >= rank(role)


class AuthError(Exception):
    """Authentication failed; ``status`` is 401, 429 or 503 and ``retry_after`` seconds."""

    def __init__(self, status: int, detail: str, retry_after: int | None = None) -> None:
        super().__init__(detail)
        self.status, self.detail, self.retry_after = status, detail, retry_after


# -- password hashes ------------------------------------------------------------------------


def hash_password(password: str, *, salt: bytes | None = None) -> str:
    """A new argon2id hash of ``password`` (UTF-8); ``salt`` only for reproducible tests."""
    if salt is not None:
        return _HASHER.hash(_utf8(password), salt=salt)
    return _HASHER.hash(_utf8(password))


def scrypt_hash(password: str, *, salt: bytes | None = None) -> str:
    """A legacy scrypt hash (the format of ``http.accounts``), for tests and old tools."""
    salt = salt or os.urandom(16)
    key = hashlib.scrypt(_utf8(password), salt=salt, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P)
    b64 = base64.b64encode
    return f"scrypt${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${b64(salt).decode()}${b64(key).decode()}"


def _utf8(text: str) -> bytes:
    """``text`` as UTF-8; a lone surrogate (never typed, only crafted) passes as its bytes so a
    crafted password fails like any wrong one instead of raising."""
    return text.encode("utf-8", "surrogatepass")


def _verify_scrypt(password: str, encoded: str) -> bool:
    parts = encoded.split("$")
    if len(parts) != 6 or parts[0] != "scrypt":
        return False
    try:
        n, r, p = int(parts[1]), int(parts[2]), int(parts[3])
        salt, key = base64.b64decode(parts[4]), base64.b64decode(parts[5])
        actual = hashlib.scrypt(
            _utf8(password), salt=salt, n=n, r=r, p=p, dklen=len(key), maxmem=2**26
        )
    except (ValueError, binascii.Error):
        return False
    return hmac.compare_digest(actual, key)


def verify_password(password: str, encoded: str) -> bool:
    """True if ``password`` matches ``encoded`` (argon2id, or a legacy scrypt hash)."""
    if encoded.startswith("scrypt$"):
        return _verify_scrypt(password, encoded)
    try:
        return _HASHER.verify(encoded, _utf8(password))
    except (argon2.exceptions.VerificationError, argon2.exceptions.InvalidHashError):
        return False


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


# -- users in the database ------------------------------------------------------------------


@dataclass(frozen=True)
class User:
    """An archive user."""

    name: str
    role: str
    password_hash: str
    disabled: bool


def check_name(name: str) -> str:
    """``name`` if it is a valid user name; ``ValueError`` naming the rule otherwise."""
    if not _NAME.fullmatch(name):
        raise ValueError(f"user name {name!r}: 1-64 of A-Z a-z 0-9 _ . @ -")
    return name


def check_role(role: str) -> str:
    """``role`` if it is one of ``ROLES``."""
    if role not in ROLES:
        raise ValueError(f"role {role!r}: one of {', '.join(ROLES)}")
    return role


class UserStore:
    """Users, API tokens and sessions in the archive database; every change audited."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def get(self, name: str) -> User | None:
        """The user called ``name``, or None."""
        with self.engine.connect() as conn:
            row = conn.execute(select(users).where(users.c.name == name)).first()
        if row is None:
            return None
        return User(row.name, row.role, row.password_hash, bool(row.disabled))

    def add(
        self, name: str, role: str, password: str, actor: Actor, *, hashed: str | None = None
    ) -> None:
        """Create a user; ``ArchiveError`` if the name is taken.  ``hashed``: ``password``'s
        hash made earlier (test fixtures add many users with one password)."""
        check_name(name)
        check_role(role)
        if not password:
            raise ValueError("password: empty")
        now = utcnow()
        if hashed is None:
            hashed = hash_password(password)
        try:
            with self.engine.begin() as conn:
                conn.execute(
                    insert(users).values(
                        name=name, role=role, password_hash=hashed, disabled=False,
                        created_at=now, updated_at=now,
                    )
                )  # fmt: skip
                record(conn, actor, "user.add", name, {"role": role})
        except IntegrityError as exc:
            raise ArchiveError(f"user {name!r} exists already") from exc

    def list(self) -> list[dict[str, Any]]:
        """Every user (never the hash)."""
        from deploy.collector.queries import rfc3339

        query = select(users.c.name, users.c.role, users.c.disabled, users.c.created_at)
        with self.engine.connect() as conn:
            rows = conn.execute(query.order_by(users.c.name)).all()
        return [
            {"name": r.name, "role": r.role, "disabled": bool(r.disabled),
             "created_at": rfc3339(r.created_at)}
            for r in rows
        ]  # fmt: skip

    def disable(self, name: str, actor: Actor) -> None:
        """Disable a user: refused from the next request on; sessions and tokens end."""
        now = utcnow()
        with self.engine.begin() as conn:
            changed = conn.execute(
                update(users).where(users.c.name == name).values(disabled=True, updated_at=now)
            ).rowcount
            if not changed:
                raise ArchiveError(f"no user {name!r}")
            conn.execute(sessions.delete().where(sessions.c.user_name == name))
            conn.execute(
                update(api_tokens)
                .where(api_tokens.c.user_name == name, api_tokens.c.revoked_at.is_(None))
                .values(revoked_at=now)
            )
            record(conn, actor, "user.disable", name, {"disabled": True})

    def new_token(self, name: str, label: str | None, actor: Actor) -> str:
        """A new API token for ``name`` (returned once; only its digest is stored)."""
        user = self.get(name)
        if user is None or user.disabled:
            raise ArchiveError(f"no enabled user {name!r}")
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        with self.engine.begin() as conn:
            conn.execute(
                insert(api_tokens).values(
                    user_name=name, digest=_digest(token), label=label, created_at=utcnow()
                )
            )
            record(conn, actor, "user.token", name, {"label": label})
        return token

    def token_user(self, token: str) -> User | None:
        """The enabled user an unrevoked token belongs to, or None."""
        query = select(api_tokens.c.user_name).where(
            api_tokens.c.digest == _digest(token), api_tokens.c.revoked_at.is_(None)
        )
        with self.engine.connect() as conn:
            name = conn.execute(query).scalar()
        user = None if name is None else self.get(name)
        return None if user is None or user.disabled else user

    def new_session(self, name: str, ttl_s: int) -> tuple[str, str, datetime]:
        """(cookie value, CSRF token, expiry) of a new session for ``name``."""
        cookie, csrf = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
        now = utcnow()
        expires = now + timedelta(seconds=ttl_s)
        with self.engine.begin() as conn:
            conn.execute(sessions.delete().where(sessions.c.expires_at < now))
            conn.execute(
                insert(sessions).values(
                    digest=_digest(cookie), user_name=name, csrf=csrf, created_at=now,
                    expires_at=expires,
                )
            )  # fmt: skip
        return cookie, csrf, expires

    def session(self, cookie: str) -> tuple[str, str] | None:
        """(user name, CSRF token) of a live session, or None (the caller checks the user)."""
        query = select(sessions).where(sessions.c.digest == _digest(cookie))
        with self.engine.connect() as conn:
            row = conn.execute(query).first()
        if row is None or row.expires_at < utcnow():
            return None
        return row.user_name, row.csrf

    def end_session(self, cookie: str) -> None:
        """Delete the session (logout)."""
        with self.engine.begin() as conn:
            conn.execute(sessions.delete().where(sessions.c.digest == _digest(cookie)))


# -- the authenticator ----------------------------------------------------------------------


class FailureLimiter:
    """Failed attempts per client in a sliding minute (bounded memory: oldest clients go)."""

    def __init__(self, per_minute: int, max_clients: int = 10000) -> None:
        self.per_minute = per_minute
        self._max = max_clients
        self._lock = threading.Lock()
        self._seen: OrderedDict[str, deque[float]] = OrderedDict()

    def _recent(self, client: str, now: float) -> deque[float]:
        times = self._seen.get(client)
        if times is None:
            return deque()
        while times and times[0] <= now - 60:
            times.popleft()
        return times

    def check(self, client: str) -> None:
        """Raise 429 if ``client`` used up its failures for this minute."""
        now = time.monotonic()
        with self._lock:
            times = self._recent(client, now)
            if len(times) >= self.per_minute:
                wait = max(1, int(times[0] + 60 - now) + 1)
                raise AuthError(429, f"too many failed logins; retry in {wait} s", wait)

    def failed(self, client: str) -> None:
        """Count one failure of ``client``."""
        now = time.monotonic()
        with self._lock:
            times = self._recent(client, now)
            times.append(now)
            self._seen[client] = times
            self._seen.move_to_end(client)
            while len(self._seen) > self._max:
                self._seen.popitem(last=False)


class Authenticator:
    """Checks passwords: database users first, then the configured legacy accounts.

    Every check costs the same whatever the name: an unknown or disabled user is checked
    against a dummy hash of the same kind; when legacy scrypt accounts exist every check runs
    one scrypt and one argon2id (real or dummy), so neither kind shows in the timing.
    """

    def __init__(
        self,
        store: UserStore,
        accounts: list[Account],
        *,
        failures_per_minute: int = 10,
        kdf_concurrency: int = 2,
        kdf_wait_s: float = 5.0,
    ) -> None:
        self.store = store
        self._legacy = {a.name: a for a in accounts}
        self.limiter = FailureLimiter(failures_per_minute)
        self._kdf = threading.BoundedSemaphore(kdf_concurrency)
        self._kdf_wait_s = kdf_wait_s
        self._dummy_argon2 = hash_password(secrets.token_hex(16))
        self._dummy_scrypt = scrypt_hash(secrets.token_hex(16)) if accounts else None
        self._cache_key = secrets.token_bytes(32)
        self._cache: OrderedDict[bytes, float] = OrderedDict()
        self._cache_lock = threading.Lock()
        if accounts:
            log.warning(
                "http.accounts (%s) still work; move them into the archive with "
                "`omis collect user add NAME --role ROLE` and delete the list",
                ", ".join(sorted(self._legacy)),
            )

    def _find(self, name: str) -> tuple[str, str, str] | None:
        """(name, role, hash) of an enabled user or legacy account; None otherwise."""
        if not _NAME.fullmatch(name):  # never reaches SQL (a NUL breaks PostgreSQL)
            return None
        user = self.store.get(name)
        if user is not None:
            return None if user.disabled else (user.name, user.role, user.password_hash)
        account = self._legacy.get(name)
        return None if account is None else (account.name, account.role, account.password_hash)

    def account(self, name: str) -> tuple[str, str] | None:
        """(name, role) of an enabled user or legacy account (a session's owner), or None."""
        found = self._find(name)
        return None if found is None else (found[0], found[1])

    def _cached(self, key: bytes) -> bool:
        with self._cache_lock:
            expiry = self._cache.get(key)
            return expiry is not None and expiry > time.monotonic()

    def _remember(self, key: bytes) -> None:
        with self._cache_lock:
            self._cache[key] = time.monotonic() + 300
            self._cache.move_to_end(key)
            while len(self._cache) > 1000:
                self._cache.popitem(last=False)

    def _run_kdf(self, password: str, encoded: str | None) -> bool:
        """Verify against ``encoded`` (None = refuse) at the same cost as any other check."""
        if not self._kdf.acquire(timeout=self._kdf_wait_s):
            raise AuthError(503, "password checks are busy; retry shortly", 2)
        try:
            is_scrypt = encoded is not None and encoded.startswith("scrypt$")
            argon2_hash = encoded if encoded is not None and not is_scrypt else self._dummy_argon2
            ok_argon2 = verify_password(password, argon2_hash)
            ok_scrypt = False
            if self._dummy_scrypt is not None:  # legacy accounts exist: always pay for both
                scrypt = encoded if encoded is not None and is_scrypt else self._dummy_scrypt
                ok_scrypt = verify_password(password, scrypt)
        finally:
            self._kdf.release()
        if encoded is None:
            return False
        return ok_scrypt if is_scrypt else ok_argon2

    def check_password(self, name: str, password: str, client: str) -> Principal:
        """The principal for ``name``/``password``; ``AuthError`` (401/429/503) otherwise."""
        found = self._find(name)
        encoded = None if found is None else found[2]
        key = hmac.digest(
            self._cache_key, _utf8("\0".join((name, password, encoded or ""))), "sha256"
        )
        # Recently verified credentials pass without the KDF and before the limit, so a flood
        # of wrong guesses from one address does not lock out a user working beside it.
        if found is not None and self._cached(key):
            return Principal(found[0], found[1], "basic")
        self.limiter.check(client)
        if not self._run_kdf(password, encoded) or found is None:
            self.limiter.failed(client)
            raise AuthError(401, "wrong user name or password")
        self._remember(key)
        return Principal(found[0], found[1], "basic")

    def check_token(self, token: str, client: str) -> Principal:
        """The principal of an API token; ``AuthError`` otherwise (counted as a failure)."""
        user = self.store.token_user(token)
        if user is None:
            self.limiter.check(client)
            self.limiter.failed(client)
            raise AuthError(401, "unknown or revoked API token")
        return Principal(user.name, user.role, "token")


def basic_credentials(header: str) -> tuple[str, str] | None:
    """(name, password) of an ``Authorization: Basic`` header, decoded as UTF-8 (RFC 7617)."""
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None
    name, sep, password = decoded.partition(":")
    return (name, password) if sep else None
