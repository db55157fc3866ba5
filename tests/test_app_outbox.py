"""The durable outbox: FIFO order, bounds, WAL, idempotent puts, crash safety, refused rows."""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from broker_support import wait_until
from paho.mqtt.properties import Properties

from deploy.broker import parse_broker_url
from deploy.config import MqttConfig
from deploy.exceptions import OutboxError, OutboxFullError
from deploy.mqtt import MqttLink, OutboxPump, Topics
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


class RefusingLink(MqttLink):
    """An MqttLink that never touches the network: records publishes, hands out message ids."""

    def __init__(self) -> None:
        super().__init__(MqttConfig(), parse_broker_url("mqtt://127.0.0.1:1"), Topics("p", "d"))
        self.connected.set()
        self.sent: list[tuple[int, bytes]] = []
        self._lock = threading.Lock()

    def publish(
        self,
        topic: str,
        payload: bytes | str,
        qos: int = 1,
        retain: bool = False,
        properties: Properties | None = None,
    ) -> int:
        with self._lock:
            mid = len(self.sent) + 1
            self.sent.append((mid, payload if isinstance(payload, bytes) else payload.encode()))
        return mid

    def count(self) -> int:
        with self._lock:
            return len(self.sent)


def test_a_refused_result_is_retried_without_a_restart(tmp_path: Path) -> None:
    link = RefusingLink()
    stop = threading.Event()
    with Outbox(tmp_path / "o.db") as box:
        box.put("m-acl", "p/d/result", b"r1")
        pump = OutboxPump(box, link, max_inflight=4, retry_min_s=0.05, retry_max_s=0.2)
        worker = threading.Thread(target=pump.run, args=(stop,), daemon=True)
        worker.start()
        try:
            assert wait_until(lambda: link.count() == 1, 5)
            pump.on_puback(1, False)  # PUBACK reason >= 0x80 (e.g. not authorised)
            assert wait_until(lambda: link.count() == 2, 5), "refused row never retried"
            pump.on_puback(2, False)
            assert wait_until(lambda: link.count() == 3, 5), "second retry missing"
            assert box.stats().rows == 1  # nothing is dropped while the broker refuses
            pump.on_puback(3, True)
            assert wait_until(lambda: box.stats().rows == 0, 5)
            time.sleep(0.3)  # past the back-off cap: an acknowledged row is not sent again
        finally:
            stop.set()
            pump.notify()
            worker.join(5)
    assert [payload for _, payload in link.sent] == [b"r1"] * 3
    assert (pump.rejected, pump.acked) == (2, 1)


def test_unacknowledged_rows_are_replayed_in_order_after_a_reconnect(tmp_path: Path) -> None:
    """A broker restart can leave publishes that paho never re-sends: the outbox replays them."""
    link = RefusingLink()  # records publishes; PUBACKs come only from the test
    stop = threading.Event()
    with Outbox(tmp_path / "o.db") as box:
        for i in range(3):
            box.put(f"m{i}", "p/d/result", f"r{i}".encode())
        pump = OutboxPump(box, link, max_inflight=8)
        worker = threading.Thread(target=pump.run, args=(stop,), daemon=True)
        worker.start()
        try:
            assert wait_until(lambda: link.count() == 3, 5)
            pump.on_puback(1, True)  # r0 acknowledged before the outage
            assert wait_until(lambda: box.stats().rows == 2, 5)
            link.connects += 1  # the link came back; mids 2 and 3 never got their PUBACK
            pump.reconnected()
            assert wait_until(lambda: link.count() == 5, 5), "unacknowledged rows not replayed"
            pump.on_puback(2, True)  # a late PUBACK for an old mid still acknowledges r1
            pump.on_puback(5, True)  # r2, re-sent as mid 5
            assert wait_until(lambda: box.stats().rows == 0, 5)
            pump.on_puback(4, True)  # duplicate delivery of r1: harmless
            time.sleep(0.2)
        finally:
            stop.set()
            pump.notify()
            worker.join(5)
    assert [payload for _, payload in link.sent] == [b"r0", b"r1", b"r2", b"r1", b"r2"]
    assert pump.acked == 3


class WrappingLink(RefusingLink):
    """Hands out message ids from ``first_mid`` on, as paho does after its 16-bit mid wraps;
    ``ack_inside`` makes the PUBACK arrive before publish() returns (a fast network thread)."""

    def __init__(self, first_mid: int, ack_inside: OutboxPump | None = None) -> None:
        super().__init__()
        self.first_mid = first_mid
        self.ack_inside = ack_inside

    def publish(
        self,
        topic: str,
        payload: bytes | str,
        qos: int = 1,
        retain: bool = False,
        properties: Properties | None = None,
    ) -> int:
        mid = super().publish(topic, payload, qos, retain, properties) + self.first_mid - 1
        if self.ack_inside is not None:
            self.ack_inside.on_puback(mid, True)
        return mid


def _pump_once(pump: OutboxPump, box: Outbox) -> None:
    stop = threading.Event()
    worker = threading.Thread(target=pump.run, args=(stop,), daemon=True)
    worker.start()
    try:
        assert wait_until(lambda: pump.published == 1, 5)
        time.sleep(0.2)  # let the pump flush whatever it believes is acknowledged
    finally:
        stop.set()
        pump.notify()
        worker.join(5)


def test_a_puback_of_another_publish_never_acknowledges_a_result(tmp_path: Path) -> None:
    """Status, replies and OTA state share the link: their PUBACKs reach the pump too.  One that
    arrives while no result is being published must not be kept and matched, after paho's mid
    wraps, to a result that the broker has not acknowledged (the row would be deleted unsent)."""
    link = WrappingLink(first_mid=7)
    with Outbox(tmp_path / "o.db") as box:
        pump = OutboxPump(box, link, max_inflight=4)
        for foreign in range(1, 2000):  # a long-running daemon's status/metrics PUBACKs
            pump.on_puback(foreign, True)
        box.put("m0", "p/d/result", b"r0")
        _pump_once(pump, box)  # r0 goes out as mid 7, the mid of an old status publish
        assert box.stats().rows == 1, "result deleted on another message's PUBACK"
        assert pump.inflight == 1
        pump.on_puback(7, True)  # its own PUBACK
        pump._flush_acks()
        assert box.stats().rows == 0


def test_a_puback_that_beats_its_bookkeeping_still_acknowledges(tmp_path: Path) -> None:
    with Outbox(tmp_path / "o.db") as box:
        pump = OutboxPump(box, RefusingLink(), max_inflight=4)
        pump.link = WrappingLink(first_mid=40, ack_inside=pump)
        box.put("m0", "p/d/result", b"r0")
        _pump_once(pump, box)
        assert box.stats().rows == 0
        assert pump.inflight == 0


@pytest.mark.parametrize("removed", [("",), ("", "-wal"), ("", "-wal", "-shm")])
def test_a_deleted_database_is_recreated_with_every_pending_row(
    tmp_path: Path, removed: tuple[str, ...]
) -> None:
    path = tmp_path / "o.db"
    with Outbox(path) as box:
        for i in range(3):
            box.put(f"m{i}", "t", f"p{i}".encode())
        box.ack([box.pending(limit=1)[0].rowid])  # m0 went out
        for suffix in removed:  # an operator (or a cleanup job) deletes the files
            Path(f"{path}{suffix}").unlink(missing_ok=True)
        assert box.check_file() is not None  # detected, with its reason
        assert "deleted" in (box.last_fault or "")
        assert path.exists()
        box.put("m3", "t", b"p3")
        assert [i.message_id for i in box.pending(limit=10)] == ["m1", "m2", "m3"]
        assert box.stats().rows == 3
        assert box.check_file() is None  # healthy again
    with Outbox(path) as again:  # and it is on disk, not in an unlinked file
        assert [i.message_id for i in again.pending(limit=10)] == ["m1", "m2", "m3"]


def test_a_recreated_database_keeps_the_rows_waiting_for_a_receipt(tmp_path: Path) -> None:
    """Device's recreation meets ingest's receipts: a sent row (PUBACKed, no receipt yet) is
    carried over as sent, with its sent time, so it is neither published again at once nor
    forgotten, and the counts stay right."""
    path = tmp_path / "o.db"
    with Outbox(path) as box:
        ids = [box.put(f"m{i}", "t", f"p{i}".encode()) for i in range(3)]
        sent_at = time.time() - 100
        assert box.mark_sent(ids[:2], at=sent_at) == 2
        path.unlink()
        assert box.check_file() is not None and "deleted" in (box.last_fault or "")
        stats = box.stats()
        assert (stats.rows, stats.sent, stats.bytes) == (1, 2, 6)
        assert box.state_of("m0") == "sent" and box.state_of("m2") == "pending"
        assert [i.message_id for i in box.pending(limit=10)] == ["m2"]
        assert box.overdue(sent_at - 1) == []  # its sent time came along, not "now"
        assert [i.message_id for i in box.overdue(sent_at + 1)] == ["m0", "m1"]
        assert box.receipt(["m1"]) == 1
        assert box.newest_receipted_sent_at == sent_at
    with Outbox(path) as again:  # on disk, as sent
        assert (again.stats().rows, again.stats().sent) == (1, 1)
        assert again.state_of("m0") == "sent"


def test_a_replaced_database_is_detected_on_the_next_write(tmp_path: Path) -> None:
    path = tmp_path / "o.db"
    with Outbox(path) as box:
        box.put("m1", "t", b"p1")
        path.unlink()
        path.write_bytes(b"")  # another file now sits at the path
        box.put("m2", "t", b"p2")  # the write notices, recreates, then stores
        assert "replaced" in (box.last_fault or "") or "deleted" in (box.last_fault or "")
        assert box.check_file() is not None  # ... and reports it once to the service
        assert box.check_file() is None
    with Outbox(path) as again:
        assert [i.message_id for i in again.pending(limit=10)] == ["m1", "m2"]


SHM_SCRIPT = r"""
import os, sys
from deploy.outbox import Outbox
path = sys.argv[1]
box = Outbox(path).open()
box.put("m1", "t", b"x")
shm = path + "-shm"
if os.path.exists(shm):
    os.truncate(shm, 0)  # a storage fault under the mapped wal-index
box.put("m2", "t", b"y")
print("ok", box.stats().rows)
"""


def test_a_shared_memory_fault_cannot_kill_the_process(tmp_path: Path) -> None:
    """With the wal-index in the process heap (exclusive locking) there is no -shm to map, so
    a damaged or vanished -shm cannot raise SIGBUS."""
    proc = subprocess.run(
        [sys.executable, "-c", SHM_SCRIPT, str(tmp_path / "o.db")],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-2000:])
    assert proc.stdout.split() == ["ok", "2"]
    assert not (tmp_path / "o.db-shm").exists()


def test_row_ids_keep_growing_across_a_recreation(tmp_path: Path) -> None:
    """The publisher's cursor is a row id: a recreated database must not start again at 1."""
    path = tmp_path / "o.db"
    with Outbox(path) as box:
        first = [box.put(f"m{i}", "t", b"p") for i in range(3)]
        box.ack(first)
        path.unlink()
        assert box.put("m3", "t", b"p") > max(first)


# ---------------------------------------------------------------- receipts (issue 19 §2)


def test_a_row_stays_after_its_puback_until_the_archive_confirms_it(tmp_path: Path) -> None:
    with Outbox(tmp_path / "o.db", max_rows=3) as box:
        ids = [box.put(f"m{i}", "p/d/result", b"x" * 10) for i in range(3)]
        assert box.mark_sent(ids[:2]) == 2
        stats = box.stats()
        assert (stats.rows, stats.sent, stats.full) == (1, 2, True)  # sent rows still count
        assert not box.has_room()
        assert [i.message_id for i in box.pending()] == ["m2"]
        assert box.state_of("m0") == "sent" and box.state_of("m2") == "pending"
        assert not box.contains("m0") and box.contains("m2")
        assert [i.message_id for i in box.overdue(time.time() + 1)] == ["m0", "m1"]
        assert box.overdue(time.time() - 3600) == []
        assert box.receipt(["m0", "m2", "never-sent-here"]) == 2  # stored and set aside alike
        stats = box.stats()
        assert (stats.rows, stats.sent, stats.bytes) == (0, 1, 10)
        assert box.state_of("m0") is None
    with Outbox(tmp_path / "o.db") as box:  # the counts survive a restart
        assert (box.stats().rows, box.stats().sent) == (0, 1)


def test_an_outbox_of_schema_1_is_upgraded_in_place(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    db = sqlite3.connect(path)
    db.execute(
        "CREATE TABLE outbox (id INTEGER PRIMARY KEY AUTOINCREMENT, message_id TEXT NOT NULL "
        "UNIQUE, topic TEXT NOT NULL, payload BLOB NOT NULL, created_at REAL NOT NULL)"
    )
    db.execute("INSERT INTO outbox VALUES (1, 'old', 't', x'00', 0)")
    db.commit()
    db.close()
    with Outbox(path) as box:
        assert box.state_of("old") == "pending"
        assert box.mark_sent([1]) == 1 and box.receipt(["old"]) == 1


M_A = "00000000-0000-4000-8000-00000000000a"
M_B = "00000000-0000-4000-8000-00000000000b"


def _receipt(held: list[str], aside: list[str]) -> bytes:
    """An ``omis.receipt/1`` as the archive sends it (``rejected``: ``{message_id, reason}``)."""
    rejected = [{"message_id": m, "reason": "set aside: not storable"} for m in aside]
    body = {"schema": "omis.receipt/1", "message_ids": held, "rejected": rejected}
    return json.dumps({**body, "collector": "c1", "at": "2026-01-01T00:00:00Z"}).encode()


def test_the_pump_keeps_sent_rows_for_receipts_and_resends_overdue_ones(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    link = RefusingLink()
    stop = threading.Event()
    with Outbox(tmp_path / "o.db") as box:
        box.put(M_A, "p/d/result", b"a")
        box.put(M_B, "p/d/result", b"b")
        pump = OutboxPump(box, link, max_inflight=4, receipts=True, receipt_timeout_s=1.0)
        worker = threading.Thread(target=pump.run, args=(stop,), daemon=True)
        worker.start()
        try:
            assert wait_until(lambda: link.count() == 2, 5)
            pump.on_puback(1, True)
            pump.on_puback(2, True)
            assert wait_until(lambda: box.stats().sent == 2, 5)
            assert box.stats().rows == 0  # nothing waits for the broker any more
            pump.on_receipt(_receipt([M_A], []))
            pump.on_receipt(b'{"schema": "other"}')  # ignored, logged
            # the old shape (rejected as bare ids, no collector/at) is not a receipt either
            pump.on_receipt(
                b'{"schema": "omis.receipt/1", "message_ids": [], "rejected": ["%s"]}'
                % M_B.encode()
            )
            assert wait_until(lambda: box.stats().sent == 1, 5)
            # m-b has no receipt: after the timeout it is published again, same bytes
            assert wait_until(lambda: link.count() == 3, 10)
            assert link.sent[-1][1] == b"b"
            pump.on_receipt(_receipt([], [M_B]))
            assert wait_until(lambda: box.stats().sent == 0, 5)
        finally:
            stop.set()
            pump.notify()
            worker.join(5)
    assert (pump.receipted, pump.resent) == (2, 1)
    # a result the archive set aside leaves the outbox, but not silently: its reason is logged
    assert any(M_B in r.message and "not storable" in r.message for r in caplog.records)
