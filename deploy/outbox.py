"""The durable result outbox: SQLite in WAL mode, one row per result, FIFO.

A result is committed here *before* it is published.  The broker's PUBACK only marks it
``sent`` (``sent_at``); it is deleted when the archive's receipt names its ``message_id``
(:meth:`Outbox.receipt`), so results survive broker outages, lost shared subscriptions, broker
queue limits, crashes and reboots; a redelivered row carries its original ``message_id``.
Without an archive (``outbox.receipts: false``) the PUBACK deletes it (:meth:`Outbox.ack`).

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

SCHEMA_VERSION = 2
_DDL = """
CREATE TABLE IF NOT EXISTS outbox (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    message_id  TEXT    NOT NULL UNIQUE,
    topic       TEXT    NOT NULL,
    payload     BLOB    NOT NULL,
    created_at  REAL    NOT NULL,
    sent_at     REAL
)
"""
_PENDING = (
    "SELECT id, message_id, topic, payload, created_at FROM outbox "
    "WHERE id > ? AND sent_at IS NULL ORDER BY id LIMIT ?"
)
_OVERDUE = (
    "SELECT id, message_id, topic, payload, created_at FROM outbox "
    "WHERE sent_at < ? ORDER BY id LIMIT ?"
)


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
    """Occupancy of the outbox: ``rows`` wait for the broker, ``sent`` for the archive's receipt.

    The bounds (``full``) count both.
    """

    rows: int
    bytes: int
    full: bool
    max_rows: int
    max_bytes: int
    sent: int = 0


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
        self.newest_receipted_sent_at = 0.0  # sent_at of the newest row a receipt deleted
        self._rows = 0  # every row held (the bounds)
        self._sent = 0  # of which acknowledged by the broker, waiting for the receipt
        self._bytes = 0
        self._identity: tuple[int, int] | None = None  # (st_dev, st_ino) of the open file
        self._fault: str | None = None  # a recovered fault not yet reported
        self._orphans: list[tuple[object, ...]] | None = None  # rows awaiting a new database
        self._last_id = 0  # the old database's AUTOINCREMENT counter, carried over
        self.last_fault: str | None = None  # the latest one, for people and tests

    def open(self) -> Outbox:
        """Open (creating if needed) the database and count what it holds."""
        db, rows, size, sent = self._connect()
        with self._lock:
            self._db, self._rows, self._bytes, self._sent = db, rows, size, sent
        log.info(
            "outbox %s: %d result(s) (%d waiting for a receipt), %d bytes",
            self.path,
            rows,
            sent,
            size,
        )
        return self

    def _connect(self) -> tuple[sqlite3.Connection, int, int, int]:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            # Before the first WAL access: the WAL index lives in the heap, no -shm is mapped.
            db.execute("PRAGMA locking_mode=EXCLUSIVE")
            db.execute("PRAGMA journal_mode=WAL")
            db.execute(f"PRAGMA synchronous={self.synchronous.upper()}")
            db.execute("PRAGMA busy_timeout=5000")
            db.execute(_DDL)
            columns = {row[1] for row in db.execute("PRAGMA table_info(outbox)")}
            if "sent_at" not in columns:  # an outbox of schema 1: nothing was marked sent
                db.execute("ALTER TABLE outbox ADD COLUMN sent_at REAL")
            db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            rows, size, sent = db.execute(
                "SELECT COUNT(*), COALESCE(SUM(LENGTH(payload)), 0), COUNT(sent_at) FROM outbox"
            ).fetchone()
            self._identity = _identity(self.path)
        except sqlite3.Error as exc:
            raise OutboxError(f"{self.path}: cannot open outbox: {exc}") from exc
        except OSError as exc:
            raise OutboxError(f"{self.path}: cannot create outbox: {exc.strerror}") from exc
        return db, int(rows), int(size), int(sent)

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
                "SELECT id, message_id, topic, payload, created_at, sent_at FROM outbox ORDER BY id"
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
        db, _, _, _ = self._connect()
        try:
            db.execute("BEGIN IMMEDIATE")
            db.executemany(
                "INSERT INTO outbox (id, message_id, topic, payload, created_at, sent_at) "
                "VALUES (?, ?, ?, ?, ?, ?)",
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
            unsent = self._rows - self._sent
            return OutboxStats(
                unsent, self._bytes, full, self.max_rows, self.max_bytes, sent=self._sent
            )

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

    def _select(self, query: str, args: tuple[float | int, ...]) -> list[OutboxItem]:
        with self._lock:
            try:
                rows = self._conn().execute(query, args).fetchall()
            except sqlite3.Error as exc:
                raise OutboxError(f"{self.path}: cannot read outbox: {exc}") from exc
        return [OutboxItem(int(r[0]), r[1], r[2], bytes(r[3]), float(r[4])) for r in rows]

    def pending(self, after_rowid: int = 0, limit: int = 100) -> list[OutboxItem]:
        """Up to ``limit`` unsent messages with row id above ``after_rowid``, oldest first."""
        return self._select(_PENDING, (after_rowid, limit))

    def overdue(self, sent_before: float, limit: int = 100) -> list[OutboxItem]:
        """Sent messages whose receipt is overdue (``sent_at < sent_before``), oldest first."""
        return self._select(_OVERDUE, (sent_before, limit))

    def mark_sent(self, rowids: Iterable[int], at: float | None = None) -> int:
        """The broker acknowledged these rows: keep them as ``sent`` until the receipt."""
        ids = list(rowids)
        when = time.time() if at is None else at
        with self._lock:
            db = self._conn()
            newly = 0
            try:
                db.execute("BEGIN IMMEDIATE")
                for rowid in ids:
                    newly += db.execute(
                        "UPDATE outbox SET sent_at = ? WHERE id = ? AND sent_at IS NULL",
                        (when, rowid),
                    ).rowcount
                    db.execute("UPDATE outbox SET sent_at = ? WHERE id = ?", (when, rowid))
                db.execute("COMMIT")
            except sqlite3.Error as exc:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise OutboxError(f"{self.path}: cannot mark rows sent: {exc}") from exc
            self._sent += newly
            return int(newly)

    def receipt(self, message_ids: Iterable[str]) -> int:
        """The archive confirmed these ``message_id`` s: delete them; returns how many."""
        ids = list(message_ids)
        with self._lock:
            db = self._conn()
            deleted = freed = sent = 0
            newest = self.newest_receipted_sent_at
            try:
                db.execute("BEGIN IMMEDIATE")
                for message_id in ids:
                    row = db.execute(
                        "DELETE FROM outbox WHERE message_id = ? "
                        "RETURNING LENGTH(payload), sent_at IS NOT NULL, sent_at",
                        (message_id,),
                    ).fetchone()
                    if row is not None:
                        deleted += 1
                        freed += int(row[0])
                        sent += int(row[1])
                        newest = max(newest, float(row[2] or 0.0))
                db.execute("COMMIT")
            except sqlite3.Error as exc:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise OutboxError(f"{self.path}: cannot delete receipted rows: {exc}") from exc
            self.newest_receipted_sent_at = newest
            self._rows -= deleted
            self._bytes -= freed
            self._sent -= sent
            return deleted

    def ack(self, rowids: Iterable[int]) -> int:
        """Delete acknowledged messages in one transaction; returns how many were deleted."""
        ids = list(rowids)
        if not ids:
            return 0
        with self._lock:
            db = self._conn()
            deleted = freed = sent = 0
            try:
                db.execute("BEGIN IMMEDIATE")
                for rowid in ids:
                    row = db.execute(
                        "DELETE FROM outbox WHERE id = ? "
                        "RETURNING LENGTH(payload), sent_at IS NOT NULL",
                        (rowid,),
                    ).fetchone()
                    if row is not None:
                        deleted += 1
                        freed += int(row[0])
                        sent += int(row[1])
                db.execute("COMMIT")
            except sqlite3.Error as exc:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise OutboxError(f"{self.path}: cannot delete acknowledged rows: {exc}") from exc
            self._rows -= deleted
            self._bytes -= freed
            self._sent -= sent
            return deleted

    def contains(self, message_id: str) -> bool:
        """True if ``message_id`` is still waiting for its PUBACK."""
        return self.state_of(message_id) == "pending"

    def state_of(self, message_id: str) -> Literal["pending", "sent"] | None:
        """``pending`` (waiting for the broker), ``sent`` (for the receipt), None (gone)."""
        with self._lock:
            row = (
                self._conn()
                .execute("SELECT sent_at FROM outbox WHERE message_id = ?", (message_id,))
                .fetchone()
            )
        if row is None:
            return None
        return "pending" if row[0] is None else "sent"


def _identity(path: Path) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino
