"""The durable result outbox: SQLite in WAL mode, one row per result, FIFO.

A result is committed here *before* it is published and deleted only when the broker's PUBACK
for it arrives, so results survive broker outages, crashes and reboots; a redelivered row
carries its original ``message_id``.

Durability: ``synchronous=FULL`` by default.  In WAL mode ``NORMAL`` is already safe against a
*process* crash but may lose the last commits on *power loss*; the appliance can lose power at
any time and writes a few results per minute, so the extra fsync per commit is cheap insurance
(``benchmarks/bench_outbox.py`` measures both).

Bounds: ``max_rows`` and ``max_bytes`` (payload bytes).  :meth:`Outbox.has_room` is the
admission check the service uses before it accepts a scan; :meth:`Outbox.put` refuses with
:class:`~deploy.exceptions.OutboxFullError` beyond the bound.  Nothing is ever dropped.
"""

from __future__ import annotations

import logging
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

    def open(self) -> Outbox:
        """Open (creating if needed) the database and count what it holds."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute(f"PRAGMA synchronous={self.synchronous.upper()}")
            db.execute("PRAGMA busy_timeout=5000")
            db.execute(_DDL)
            db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            rows, size = db.execute(
                "SELECT COUNT(*), COALESCE(SUM(LENGTH(payload)), 0) FROM outbox"
            ).fetchone()
        except sqlite3.Error as exc:
            raise OutboxError(f"{self.path}: cannot open outbox: {exc}") from exc
        except OSError as exc:
            raise OutboxError(f"{self.path}: cannot create outbox: {exc.strerror}") from exc
        with self._lock:
            self._db, self._rows, self._bytes = db, int(rows), int(size)
        log.info("outbox %s: %d pending result(s), %d bytes", self.path, rows, size)
        return self

    def close(self) -> None:
        """Close the database (idempotent)."""
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
