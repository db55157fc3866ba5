"""The broker's PUBACK is not the archive (issue 19 §2): end-to-end receipts lose nothing.

A real mosquitto (persistent, restarted with SIGTERM and SIGKILL while the device publishes;
mosquitto 2.0.11 does not restore a persistent ``$share`` subscription) and a real ``omis
collect`` process.  The device side is the appliance's own delivery path -- outbox, MQTT link,
pump -- filled directly (no scans), so the tests stay fast.  A result leaves the outbox only on
the archive's receipt; after ``receipt_timeout_s`` without one it is published again.
"""

from __future__ import annotations

import json
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from broker_support import Mosquitto, wait_until
from collector_support import collector_child, make_result
from sqlalchemy import select

from deploy.broker import parse_broker_url
from deploy.collector.db import open_engine
from deploy.collector.tables import results
from deploy.config import MqttConfig
from deploy.mqtt import MqttLink, OutboxPump, Topics
from deploy.outbox import Outbox

ROOT = Path(__file__).resolve().parent.parent
SHIPPED_CONF = ROOT / "deploy" / "mosquitto" / "mosquitto.conf"
DEVICE = "scope-07"


def shipped_limits() -> str:
    """The queue and in-flight limits of the shipped broker configuration."""
    keys = ("max_inflight_messages", "max_queued_messages", "max_packet_size")
    lines = SHIPPED_CONF.read_text("utf-8").splitlines()
    return "".join(f"{line}\n" for line in lines if line.split(" ", 1)[0] in keys)


class Device:
    """The appliance's delivery path (outbox, link, pump with receipts) without a scanner."""

    def __init__(
        self, broker: Mosquitto, state: Path, *, timeout_s: float, inflight: int = 20
    ) -> None:
        self.outbox = Outbox(
            state / "outbox.sqlite", max_rows=100_000, max_bytes=1 << 30, synchronous="normal"
        ).open()
        self.topics = Topics("omis/v1", DEVICE)
        config = MqttConfig(broker=broker.url, client_id=f"omis-{DEVICE}", reconnect_max_s=1)
        self.link = MqttLink(
            config, parse_broker_url(broker.url), self.topics, on_online=self._online
        )
        self.pump = OutboxPump(
            self.outbox, self.link, inflight, receipts=True, receipt_timeout_s=timeout_s
        )
        self.link.on_puback = self.pump.on_puback
        self.link.on_receipt = self.pump.on_receipt
        self.sent_ids: list[str] = []
        self._stop = threading.Event()
        self._worker = threading.Thread(target=self.pump.run, args=(self._stop,), daemon=True)

    def _online(self) -> None:
        self.pump.reconnected()

    def start(self) -> Device:
        self._worker.start()
        self.link.start()
        return self

    def put(self, first_seq: int, count: int) -> None:
        for seq in range(first_seq, first_seq + count):
            result = make_result(seq, device=DEVICE)
            self.outbox.put(result["message_id"], self.topics.result, json.dumps(result).encode())
            self.sent_ids.append(result["message_id"])
        self.pump.notify()

    def held(self) -> int:
        """Rows still in the outbox: waiting for the broker or for the archive's receipt."""
        stats = self.outbox.stats()
        return stats.rows + stats.sent

    def close(self) -> None:
        self._stop.set()
        self.pump.notify()
        self._worker.join(10)
        self.link.close()
        self.outbox.close()


def stored_ids(db_url: str) -> set[str]:
    engine = open_engine(db_url, writer=False)
    try:
        with engine.connect() as conn:
            return {r[0] for r in conn.execute(select(results.c.message_id))}
    finally:
        engine.dispose()


@pytest.fixture
def archive(tmp_path: Path) -> Iterator[tuple[Mosquitto, str]]:
    """A persistent mosquitto with the shipped limits and one ``omis collect`` process."""
    workdir = tmp_path / "broker"
    workdir.mkdir()
    broker = Mosquitto(workdir, persistent=True, extra_config=shipped_limits()).start()
    db_url = f"sqlite:///{tmp_path / 'archive.sqlite'}"
    collector: subprocess.Popen[str] | None = None
    try:
        collector = collector_child(broker.url, db_url, "archive-r", tmp_path / "state")
        suback = "Sending SUBACK to archive-r"
        assert wait_until(lambda: suback in broker.log_text() or collector.poll() is not None, 60)
        assert collector.poll() is None
        yield broker, db_url
        assert collector.poll() is None, "the collector died"
    finally:
        if collector is not None and collector.poll() is None:
            collector.terminate()
            collector.wait(15)
        broker.stop()


@pytest.mark.parametrize("how", ["SIGTERM", "SIGKILL"])
def test_broker_restarted_under_load_loses_nothing(
    archive: tuple[Mosquitto, str], tmp_path: Path, how: str
) -> None:
    broker, db_url = archive
    device = Device(broker, tmp_path / "dev", timeout_s=2.0).start()
    try:
        device.put(1, 200)
        assert wait_until(lambda: len(stored_ids(db_url)) >= 20, 30)
        if how == "SIGKILL":
            broker.kill()
        else:
            broker.stop()
        device.put(201, 200)  # published into the outage and the restart
        broker.start()
        device.put(401, 100)
        assert wait_until(lambda: device.held() == 0, 90), (device.outbox.stats(), how)
        assert stored_ids(db_url) == set(device.sent_ids)
        assert device.pump.receipted == 500
    finally:
        device.close()


@pytest.mark.slow
def test_a_20000_result_burst_with_the_shipped_broker_limits_loses_nothing(
    archive: tuple[Mosquitto, str], tmp_path: Path
) -> None:
    """More than ``max_queued_messages`` at once: the broker drops what it cannot queue for
    the archive; receipts bring every result in (slow: about a minute at ~500 results/s)."""
    broker, db_url = archive
    # a short receipt timeout (production: outbox.receipt_timeout_s, 300 s) only makes the
    # resends of what the broker dropped come sooner; what is checked stays the same
    device = Device(broker, tmp_path / "dev", timeout_s=3.0, inflight=100)
    device.put(1, 20_000)  # the burst is waiting before the link comes up
    device.start()
    try:
        assert wait_until(lambda: device.held() == 0, 400), device.outbox.stats()
        assert stored_ids(db_url) == set(device.sent_ids)
    finally:
        device.close()


def test_omis_scan_with_a_dotted_device_id_is_archived_and_receipted(
    archive: tuple[Mosquitto, str], tmp_path: Path
) -> None:
    """Issue 19: ``lab.scope-1`` was acknowledged by the broker and silently lost.  Now the
    archive stores it and confirms it; ``omis scan --receipt-wait`` reports that."""
    import sys

    from fakes.bundles import make_bundle

    broker, db_url = archive
    make_bundle(tmp_path / "bundle")
    argv = [
        sys.executable, "-m", "deploy.cli", "scan", "--microscope", "sim://?seed=5",
        "--broker", broker.url, "--bundle", str(tmp_path / "bundle"), "--slides", "2",
        "--fields", "2", "--device-id", "lab.scope-1", "--state-dir", str(tmp_path / "state"),
        "--receipt-wait", "30", "--json",
    ]  # fmt: skip
    done = subprocess.run(argv, check=False, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout)
    assert [r["archived"] for r in report["results"]] == [True, True]
    assert {r["message_id"] for r in report["results"]} <= stored_ids(db_url)
    remaining = Outbox(tmp_path / "state" / "outbox.sqlite").open()
    try:
        assert remaining.stats().rows == remaining.stats().sent == 0
    finally:
        remaining.close()


def _shipped_max_packet() -> int:
    line = next(x for x in shipped_limits().splitlines() if x.startswith("max_packet_size"))
    return int(line.split()[1])


@pytest.mark.parametrize(
    ("held", "aside", "reason"),
    [
        (2500, 0, ""),
        (0, 2500, "x" * 2000),  # long reasons: cut, still named
        (1000, 1000, "\u00e9\u2028\x00" * 400),  # escaped in JSON: six bytes a character
    ],
)
def test_receipts_are_split_to_fit_the_broker_and_name_every_id(
    held: int, aside: int, reason: str
) -> None:
    """One batch's receipt for one device: every id (held or set aside, with its reason)
    arrives, in valid ``omis.receipt/1`` messages the shipped broker accepts."""
    import uuid

    from deploy.collector.ingest import Receipts
    from deploy.messages.receipt import MAX_RECEIPT_IDS
    from deploy.mqtt import receipt_ids

    receipts = Receipts()
    receipts.message_ids = [str(uuid.uuid4()) for _ in range(held)]
    receipts.rejected = [(str(uuid.uuid4()), f"{i}: {reason}") for i in range(aside)]
    named: list[str] = []
    for payload in receipts.messages("archive-r"):
        assert len(payload) + 256 < _shipped_max_packet()  # + topic and MQTT header
        body = json.loads(payload)
        assert len(body["message_ids"]) <= MAX_RECEIPT_IDS >= len(body["rejected"])
        assert all(r["reason"] for r in body["rejected"])
        ids = receipt_ids(payload)
        assert ids is not None, payload[:200]
        named += ids
    expected = receipts.message_ids + [m for m, _ in receipts.rejected]
    assert sorted(named) == sorted(expected)
