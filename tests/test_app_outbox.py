"""The durable outbox: FIFO order, bounds, WAL, idempotent puts, crash safety."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from deploy.exceptions import OutboxError, OutboxFullError
from deploy.outbox import Outbox


def test_fifo_order_and_ack(tmp_path: Path) -> None:
    with Outbox(tmp_path / "o.db") as box:
        ids = [box.put(f"m{i}", "t", f"p{i}".encode()) for i in range(10)]
        assert ids == sorted(ids)
        items = box.pending(limit=4)
        assert [i.message_id for i in items] == ["m0", "m1", "m2", "m3"]
        assert [i.message_id for i in box.pending(after_rowid=items[-1].rowid, limit=2)] == [
            "m4",
            "m5",
        ]
        assert box.ack([items[0].rowid, items[2].rowid, 999999]) == 2
        assert [i.message_id for i in box.pending(limit=3)] == ["m1", "m3", "m4"]
        assert box.stats().rows == 8
        assert not box.contains("m0")
        assert box.contains("m1")


def test_survives_reopen_with_same_message_ids(tmp_path: Path) -> None:
    path = tmp_path / "o.db"
    with Outbox(path) as box:
        box.put("a", "t", b"1")
        box.put("b", "t", b"22")
    with Outbox(path) as box:
        assert [(i.message_id, i.payload) for i in box.pending()] == [("a", b"1"), ("b", b"22")]
        assert box.stats().bytes == 3


def test_put_same_message_id_is_idempotent(tmp_path: Path) -> None:
    with Outbox(tmp_path / "o.db") as box:
        first = box.put("a", "t", b"x")
        assert box.put("a", "t", b"x") == first
        assert box.stats().rows == 1


def test_row_bound_refuses_without_dropping(tmp_path: Path) -> None:
    with Outbox(tmp_path / "o.db", max_rows=3) as box:
        for i in range(3):
            box.put(f"m{i}", "t", b"x")
        assert not box.has_room()
        assert box.stats().full
        with pytest.raises(OutboxFullError):
            box.put("m3", "t", b"x")
        assert [i.message_id for i in box.pending()] == ["m0", "m1", "m2"]
        box.ack([box.pending(limit=1)[0].rowid])
        assert box.has_room()
        box.put("m3", "t", b"x")


def test_byte_bound(tmp_path: Path) -> None:
    with Outbox(tmp_path / "o.db", max_bytes=1024) as box:
        box.put("a", "t", b"x" * 1000)
        with pytest.raises(OutboxFullError):
            box.put("b", "t", b"x" * 100)
        box.put("c", "t", b"x" * 24)
        assert not box.has_room()


def test_wal_and_synchronous_modes(tmp_path: Path) -> None:
    for mode, expected in (("full", 2), ("normal", 1)):
        with Outbox(tmp_path / f"{mode}.db", synchronous=mode) as box:  # type: ignore[arg-type]
            box.put("a", "t", b"x")
            db = box._conn()
            assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
            assert db.execute("PRAGMA synchronous").fetchone()[0] == expected


def test_closed_outbox_raises_and_close_is_idempotent(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.db").open()
    box.close()
    box.close()
    with pytest.raises(OutboxError):
        box.put("a", "t", b"x")


def test_unopenable_path_is_a_clear_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OutboxError, match="cannot"):
        Outbox(blocker / "o.db").open()


CRASH_SCRIPT = """
import os, signal, sys
from deploy.outbox import Outbox
box = Outbox(sys.argv[1]).open()
for i in range(20):
    box.put(f"committed-{i}", "t", b"x" * 100)
db = box._conn()
db.execute("BEGIN IMMEDIATE")
for i in range(500):
    db.execute("INSERT INTO outbox (message_id, topic, payload, created_at) VALUES (?, 't', ?, 0)",
               (f"uncommitted-{i}", b"y" * 1000))
print("MID", flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_process_killed_mid_transaction_leaves_consistent_db(tmp_path: Path) -> None:
    path = tmp_path / "o.db"
    proc = subprocess.run(
        [sys.executable, "-c", CRASH_SCRIPT, str(path)],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == -signal.SIGKILL
    assert "MID" in proc.stdout
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    db.close()
    with Outbox(path) as box:
        ids = [i.message_id for i in box.pending(limit=1000)]
        assert ids == [f"committed-{i}" for i in range(20)]
        assert box.stats().rows == 20
