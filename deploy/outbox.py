"""The durable result outbox: SQLite in WAL mode, one row per result, FIFO.

A result is committed here *before* it is published and deleted only when the broker's PUBACK
for it arrives, so results survive broker outages, crashes and reboots; a redelivered row
carries its original ``message_id``.

Durability: ``synchronous=FULL`` by default.  In WAL mode ``NORMAL`` is already safe against a
*process* crash but may lose the last commits on *power loss*; the appliance can lose power at
any time and writes a few results per minute, so the extra fsync per commit is cheap insurance
(``benchmarks/bench_outbox.py`` measures both).

Storage faults.  The database is opened with ``locking_mode=EXCLUSIVE`` before WAL is
enabled, so SQLite keeps the WAL index in this process's heap and never maps a ``-shm`` file: a
damaged, truncated or unwritable ``-shm`` cannot kill the daemon with SIGBUS (the price: no
other process opens the outbox while the daemon runs; the status and health file report its
rows).  The file's identity (device, inode) is checked before every write and by the
service's loop (:meth:`Outbox.check_file`): when the database was deleted or replaced under the
running daemon, every pending row is still readable through the open connection; they are
copied into a new database at the path (same row ids), and the fault is reported once so the
service publishes ``degraded``.  Nothing is lost silently.

Bounds: ``max_rows`` and ``max_bytes`` (payload bytes).  :meth:`Outbox.has_room` is the
admission check the service uses before it accepts a scan; :meth:`Outbox.put` refuses with
:class:`~deploy.exceptions.OutboxFullError` beyond the bound.  Nothing is ever dropped.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Literal

from deploy.exceptions import OutboxError, OutboxFullError

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
_DDL = """
CREATE TABLE IF NOT EXISTS outbox (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    message_id  TEXT    NOT NULL UNIQUE,
    topic       TEXT    NOT NULL,
    payload     BLOB    NOT NULL,
    created_at  REAL    NOT NULL
)
"""


@dataclass(frozen=True)
class OutboxItem:
    """One stored message."""

    rowid: int
    message_id: str
    topic: str
    payload: bytes
    created_at: float


@dataclass(frozen=True)
class OutboxStats:
    """Occupancy of the outbox."""

    rows: int
    bytes: int
    full: bool
    max_rows: int
    max_bytes: int


class Outbox:
    """A bounded FIFO of messages on disk; thread-safe; a context manager."""

    def __init__(
        self,
        path: str | Path,
        max_rows: int = 10000,
        max_bytes: int = 64 * 1024 * 1024,
        synchronous: Literal["full", "normal"] = "full",
    ) -> None:
        self.path = Path(path)
        self.max_rows = max_rows
        self.max_bytes = max_bytes
        self.synchronous = synchronous
        self._db: sqlite3.Connection | None = None
        self._lock = threading.Lock()
        self._rows = 0
        self._bytes = 0
        self._identity: tuple[int, int] | None = None  # (st_dev, st_ino) of the open file
        self._fault: str | None = None  # a recovered fault not yet reported
        self._orphans: list[tuple[object, ...]] | None = None  # rows awaiting a new database
        self._last_id = 0  # the old database's AUTOINCREMENT counter, carried over
        self.last_fault: str | None = None  # the latest one, for people and tests

    def open(self) -> Outbox:
        """Open (creating if needed) the database and count what it holds."""
        db, rows, size = self._connect()
        with self._lock:
            self._db, self._rows, self._bytes = db, rows, size
        log.info("outbox %s: %d pending result(s), %d bytes", self.path, rows, size)
        return self

    def _connect(self) -> tuple[sqlite3.Connection, int, int]:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            # Before the first WAL access: the WAL index lives in the heap, no -shm is mapped.
            db.execute("PRAGMA locking_mode=EXCLUSIVE")
            db.execute("PRAGMA journal_mode=WAL")
            db.execute(f"PRAGMA synchronous={self.synchronous.upper()}")
            db.execute("PRAGMA busy_timeout=5000")
            db.execute(_DDL)
            db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            rows, size = db.execute(
                "SELECT COUNT(*), COALESCE(SUM(LENGTH(payload)), 0) FROM outbox"
            ).fetchone()
            self._identity = _identity(self.path)
        except sqlite3.Error as exc:
            raise OutboxError(f"{self.path}: cannot open outbox: {exc}") from exc
        except OSError as exc:
            raise OutboxError(f"{self.path}: cannot create outbox: {exc.strerror}") from exc
        return db, int(rows), int(size)

    def check_file(self) -> str | None:
        """Recreate the database if it was deleted or replaced under us; returns the reason of a
        fault recovered since the last call (once), else None.  Raises :class:`OutboxError`
        when it cannot be recreated."""
        with self._lock:
            self._ensure_file()
            fault, self._fault = self._fault, None
        return fault

    def _ensure_file(self) -> None:
        """With the lock held: the open connection still owns the file at ``path``."""
        if self._orphans is not None:
            self._restore("deleted")  # an earlier recreation failed: try again
            return
        if self._db is None:
            return
        try:
            now = _identity(self.path)
        except FileNotFoundError:
            now = None
        except OSError as exc:
            raise OutboxError(f"{self.path}: cannot check the outbox file: {exc.strerror}") from exc
        if now == self._identity:
            return
        what = "deleted" if now is None else "replaced by another file"
        self._recreate(what)

    def _recreate(self, what: str) -> None:
        old = self._conn()
        try:
            rows = old.execute(
                "SELECT id, message_id, topic, payload, created_at FROM outbox ORDER BY id"
            ).fetchall()
            seq = old.execute("SELECT seq FROM sqlite_sequence WHERE name = 'outbox'").fetchone()
            self._last_id = int(seq[0]) if seq else 0
        except sqlite3.Error as exc:
            raise OutboxError(f"{self.path}: {what} and its rows unreadable: {exc}") from exc
        # Closed first: closing deletes "<path>-wal" by name, which must not be the new one's.
        # Until the new database holds them, the rows live in memory (retried on each check).
        old.close()
        self._db, self._orphans = None, rows
        self._restore(what)

    def _restore(self, what: str) -> None:
        rows = self._orphans or []
        for suffix in ("", "-wal", "-shm", "-journal"):
            Path(f"{self.path}{suffix}").unlink(missing_ok=True)  # leftovers of the old one
        db, _, _ = self._connect()
        try:
            db.execute("BEGIN IMMEDIATE")
            db.executemany(
                "INSERT INTO outbox (id, message_id, topic, payload, created_at) "
                "VALUES (?, ?, ?, ?, ?)",
                rows,
            )
            # Row ids keep growing across the recreation: the publisher's cursor stays valid.
            db.execute("DELETE FROM sqlite_sequence WHERE name = 'outbox'")
            db.execute(
                "INSERT INTO sqlite_sequence (name, seq) VALUES ('outbox', ?)", (self._last_id,)
            )
            db.execute("COMMIT")
        except sqlite3.Error as exc:
            db.close()
            raise OutboxError(f"{self.path}: cannot recreate the outbox: {exc}") from exc
        self._db, self._orphans = db, None
        reason = (
            f"outbox database {self.path} was {what} under the running daemon; recreated "
            f"with its {len(rows)} pending result(s)"
        )
        log.error("%s", reason)
        self._fault = self.last_fault = reason

    def close(self) -> None:
        """Close the database (idempotent)."""
        self._identity = None
        with self._lock:
            db, self._db = self._db, None
        if db is not None:
            db.close()

    def __enter__(self) -> Outbox:
        return self.open() if self._db is None else self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            raise OutboxError(f"{self.path}: outbox is not open")
        return self._db

    def has_room(self) -> bool:
        """True while below both bounds: the admission check before accepting a scan."""
        with self._lock:
            return self._rows < self.max_rows and self._bytes < self.max_bytes

    def stats(self) -> OutboxStats:
        """Current occupancy."""
        with self._lock:
            full = self._rows >= self.max_rows or self._bytes >= self.max_bytes
            return OutboxStats(self._rows, self._bytes, full, self.max_rows, self.max_bytes)

    def put(self, message_id: str, topic: str, payload: bytes) -> int:
        """Commit one message durably; returns its row id (its place in the FIFO).

        Raises :class:`OutboxFullError` when it would exceed a bound.  Putting a
        ``message_id`` that is already stored is a no-op returning the existing row.
        """
        with self._lock:
            self._ensure_file()  # a result never goes into a deleted file
            db = self._conn()
            if self._rows + 1 > self.max_rows or self._bytes + len(payload) > self.max_bytes:
                raise OutboxFullError(
                    f"outbox full ({self._rows}/{self.max_rows} rows, "
                    f"{self._bytes}/{self.max_bytes} bytes)"
                )
            try:
                cur = db.execute(
                    "INSERT INTO outbox (message_id, topic, payload, created_at) "
                    "VALUES (?, ?, ?, ?) ON CONFLICT(message_id) DO NOTHING",
                    (message_id, topic, payload, time.time()),
                )
                if cur.rowcount == 0:
                    row = db.execute(
                        "SELECT id FROM outbox WHERE message_id = ?", (message_id,)
                    ).fetchone()
                    return int(row[0])
            except sqlite3.Error as exc:
                raise OutboxError(f"{self.path}: cannot store result: {exc}") from exc
            self._rows += 1
            self._bytes += len(payload)
            return int(cur.lastrowid or 0)

    def pending(self, after_rowid: int = 0, limit: int = 100) -> list[OutboxItem]:
        """Up to ``limit`` messages with row id greater than ``after_rowid``, oldest first."""
        with self._lock:
            try:
                rows = (
                    self._conn()
                    .execute(
                        "SELECT id, message_id, topic, payload, created_at FROM outbox "
                        "WHERE id > ? ORDER BY id LIMIT ?",
                        (after_rowid, limit),
                    )
                    .fetchall()
                )
            except sqlite3.Error as exc:
                raise OutboxError(f"{self.path}: cannot read outbox: {exc}") from exc
        return [OutboxItem(int(r[0]), r[1], r[2], bytes(r[3]), float(r[4])) for r in rows]

    def ack(self, rowids: Iterable[int]) -> int:
        """Delete acknowledged messages in one transaction; returns how many were deleted."""
        ids = list(rowids)
        if not ids:
            return 0
        with self._lock:
            db = self._conn()
            deleted = freed = 0
            try:
                db.execute("BEGIN IMMEDIATE")
                for rowid in ids:
                    row = db.execute(
                        "DELETE FROM outbox WHERE id = ? RETURNING LENGTH(payload)", (rowid,)
                    ).fetchone()
                    if row is not None:
                        deleted += 1
                        freed += int(row[0])
                db.execute("COMMIT")
            except sqlite3.Error as exc:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise OutboxError(f"{self.path}: cannot delete acknowledged rows: {exc}") from exc
            self._rows -= deleted
            self._bytes -= freed
            return deleted

    def contains(self, message_id: str) -> bool:
        """True if ``message_id`` is still waiting for its PUBACK."""
        with self._lock:
            row = (
                self._conn()
                .execute("SELECT 1 FROM outbox WHERE message_id = ?", (message_id,))
                .fetchone()
            )
        return row is not None


def _identity(path: Path) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino
