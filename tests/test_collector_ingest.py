"""No single message stops ingest (issue 19 §2): poison payloads against real ``omis collect``.

Two collector processes share one archive (SQLite and PostgreSQL) and one ``$share`` group on a
real mosquitto.  Every poison is followed by valid results; all of those must be stored, and
every poison must be in ``GET /api/rejected`` with its bytes as sent.
"""

from __future__ import annotations

import base64
import json
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from broker_support import (
    Collector,
    Mosquitto,
    mosquitto_fixture,  # noqa: F401 - the "mosquitto" fixture
    port_open,
    publish,
    wait_until,
)
from collector_support import (
    collector_child,
    database_url,  # noqa: F401
    make_result,
    postgres_server,  # noqa: F401
)

from deploy.broker import free_port

DEVICE = "scope-07"
TOPIC = f"omis/v1/{DEVICE}/result"


def _result_bytes(change: Callable[[dict[str, Any]], None]) -> bytes:
    result = make_result(900, device=DEVICE)
    change(result)
    return json.dumps(result).encode()


def _text_poison(marker: str, replacement: str) -> bytes:
    """A result whose JSON text has ``"p_high": 0.5`` replaced (values json cannot build)."""
    result = make_result(901, device=DEVICE)
    result["prediction"]["p_high"] = 0.5
    text = json.dumps(result)
    assert marker in text
    return text.replace(marker, replacement).encode()


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def change(result: dict[str, Any]) -> None:
        *head, last = path.split(".")
        target = result
        for key in head:
            target = target[key]
        target[last] = value

    return change


POISONS: dict[str, bytes] = {
    "nested 100,000 deep": _text_poison(
        '"p_high": 0.5', '"p_high": 0.5, "deep": ' + "[" * 100_000 + "]" * 100_000
    ),
    "p_high of 401 digits": _text_poison('"p_high": 0.5', '"p_high": 1' + "0" * 400),
    "p_high 1e400": _text_poison('"p_high": 0.5', '"p_high": 1e400'),
    "probabilities [1]": _result_bytes(_set("prediction.probabilities", [1])),
    "year 0001": _result_bytes(_set("started_at", "0001-01-01T00:30:00+01:00")),
    "year 0001 Z": _result_bytes(_set("finished_at", "0001-01-01T00:00:00Z")),
    "seq 2**63": _result_bytes(_set("seq", 2**63)),
    "NUL in slide_id": _result_bytes(_set("slide_id", "S-\x00-1")),
    "65-char label": _result_bytes(_set("prediction.label", "x" * 65)),
    "non-numeric model.version": _result_bytes(_set("model.version", "four")),
    "dict label": _result_bytes(_set("prediction.label", {"a": 1})),
    "lone surrogate": _text_poison('"p_high": 0.5', '"p_high": 0.5, "note": "\\ud800"'),
    "non-UTF-8": b'{"schema": "omis.result/1", "slide_id": "\xff\xfe"}',
    "non-JSON": b"{not json",
    "schema-violating": json.dumps({"schema": "omis.result/1", "message_id": "x"}).encode(),
    "other device in body": _result_bytes(_set("device_id", "scope-99")),
}
# Poisons that are still JSON objects with a UUID message_id: their receipt names it.
WITH_ID = [
    n
    for n in POISONS
    if n
    not in {
        "nested 100,000 deep",
        "non-UTF-8",
        "non-JSON",
        "schema-violating",
        "p_high of 401 digits",
    }
]
# Retained state that is poison: every instance sees it (plain subscriptions).
STATE_POISONS: dict[str, bytes] = {
    f"omis/v1/{DEVICE}/status": b'{"schema": "omis.status/1", "x": '
    + b"[" * 50_000
    + b"]" * 50_000
    + b"}",
    f"omis/v1/{DEVICE}/ota/state": b"\xff not json",
}


@pytest.fixture
def collectors(
    mosquitto: Mosquitto, db_url: str, tmp_path: Path
) -> Iterator[tuple[list[subprocess.Popen[str]], list[str]]]:
    """Two ``omis collect`` processes on one archive and one shared-subscription group."""
    for topic, payload in STATE_POISONS.items():
        publish(mosquitto.port, topic, payload, retain=True)
    ports = [free_port(), free_port()]
    procs = [
        collector_child(mosquitto.url, db_url, f"archive-{i}", tmp_path / f"s{i}", port)
        for i, port in enumerate(ports)
    ]
    try:
        ready = wait_until(
            lambda: (
                all(f"Sending SUBACK to archive-{i}" in mosquitto.log_text() for i in (0, 1))
                or any(p.poll() is not None for p in procs)
            ),
            60,
        )
        assert ready and all(p.poll() is None for p in procs), [p.poll() for p in procs]
        # the HTTP API may come up a moment after the subscription (a loaded machine)
        up = wait_until(lambda: all(port_open(p) for p in ports), 60)
        assert up and all(p.poll() is None for p in procs), [p.poll() for p in procs]
        yield procs, [f"http://127.0.0.1:{port}" for port in ports]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
                proc.wait(15)


def test_no_poison_message_stops_ingest(
    mosquitto: Mosquitto, collectors: tuple[list[subprocess.Popen[str]], list[str]]
) -> None:
    procs, urls = collectors
    receipts = Collector(mosquitto.port, "omis/v1/+/receipt", client_id="device-view")
    receipts.__enter__()
    valid: list[str] = []
    seq = 0
    for payload in POISONS.values():
        publish(mosquitto.port, TOPIC, payload)
        for _ in range(3):
            seq += 1
            result = make_result(seq, device=DEVICE)
            valid.append(result["message_id"])
            publish(mosquitto.port, TOPIC, json.dumps(result))
    dotted = make_result(1, device="lab.scope-1")  # a device id the appliance accepts
    valid.append(dotted["message_id"])
    publish(mosquitto.port, "omis/v1/lab.scope-1/result", json.dumps(dotted))

    api = httpx.Client(base_url=urls[0], timeout=30)

    def stored() -> set[str]:
        items = api.get("/api/results", params={"limit": 1000}).json()["items"]
        return {item["message_id"] for item in items}

    def rejected_payloads() -> list[bytes]:
        body = api.get("/api/rejected", params={"limit": 1000}).json()
        return [base64.b64decode(item["payload_base64"]) for item in body["items"]]

    assert wait_until(lambda: stored() == set(valid), 60), (
        len(stored()),
        len(valid),
        [p.poll() for p in procs],
    )
    assert wait_until(lambda: len(rejected_payloads()) >= len(POISONS) + 2 * len(STATE_POISONS), 30)
    kept = rejected_payloads()
    for name, payload in POISONS.items():
        assert kept.count(payload) == 1, f"{name} not set aside exactly once"
    for payload in STATE_POISONS.values():
        assert kept.count(payload) == 2, "retained poison: one copy per instance"
    body = api.get("/api/rejected", params={"device": DEVICE, "limit": 5}).json()
    assert body["total"] == len(kept) and len(body["items"]) == 5
    for item in body["items"]:
        assert item["topic"].startswith(f"omis/v1/{DEVICE}/") and item["reason"]
        assert item["received_at"].endswith("Z") and item["kind"] == "data"
    assert body["by_device"][DEVICE] == len(kept)
    alerts = api.get("/api/alerts", params={"limit": 1000}).json()
    assert sum(a["kind"] == "rejected" for a in alerts) == len(kept)
    assert all(p.poll() is None for p in procs), "a collector died"
    # Receipts: every stored result confirmed, every set-aside result with a message_id too.
    poison_ids = {json.loads(p)["message_id"] for n, p in POISONS.items() if n in WITH_ID}
    confirmed: set[str] = set()
    aside: set[str] = set()

    def receipted() -> bool:
        for body in receipts.json_on("/receipt"):
            assert body["schema"] == "omis.receipt/1"
            confirmed.update(body["message_ids"])
            for item in body["rejected"]:  # omis.receipt/1: {message_id, reason}
                assert item["reason"], item
                aside.add(item["message_id"])
        return confirmed >= set(valid) and aside >= poison_ids

    assert wait_until(receipted, 20), (len(confirmed), len(aside))
    receipts.__exit__()


# ------------------------------------------------- in-process: store, retries, watchdog


@pytest.fixture
def engine(db_url: str) -> Iterator[Any]:
    from deploy.collector.db import migrate, open_engine

    engine = open_engine(db_url)
    migrate(engine)
    yield engine
    engine.dispose()


def test_a_second_copy_with_other_content_is_a_conflict(engine: Any) -> None:
    from deploy.collector.queries import ArchiveQueries
    from deploy.collector.store import ArchiveStore, result_row, utcnow

    store, queries = ArchiveStore(engine), ArchiveQueries(engine)
    first = make_result(1, device=DEVICE)
    # another valid result under the same message_id (label == decision, as the model demands)
    changed = {**make_result(1, device=DEVICE, p_high=0.9), "message_id": first["message_id"]}
    rows = [result_row(r, utcnow()) for r in (first, first, changed)]
    assert store.add_results(rows[:1]) == ["stored"]
    assert store.add_results(rows[1:]) == ["duplicate", "conflict"]
    kept = queries.rejected()
    assert kept["total"] == 1 and kept["items"][0]["kind"] == "conflict"
    assert json.loads(base64.b64decode(kept["items"][0]["payload_base64"])) == changed
    assert kept["items"][0]["message_id"] == first["message_id"]
    assert [a["kind"] for a in queries.alerts()] == ["conflict"]
    assert queries.get_result(first["message_id"])["result"] == first  # the first copy stays
    # both copies in one batch (one multi-row insert): the first is stored, the second kept
    again = make_result(2, device=DEVICE)
    other = json.loads(json.dumps(again))
    other["slide_id"] = "S-other"
    batch = [result_row(r, utcnow()) for r in (again, again, other)]
    assert store.add_results(batch) == ["stored", "duplicate", "conflict"]
    assert queries.rejected()["total"] == 2


def test_a_result_the_model_refuses_is_named_once_in_the_reason() -> None:
    """The rejected table's reason is one line naming the field, prefixed once."""
    from deploy.collector.store import result_row, utcnow
    from deploy.exceptions import MessageRejectedError

    bad = make_result(1, device=DEVICE)
    bad["prediction"]["label"] = bad["prediction"]["risk"] = "high"  # p_high 0.2: low
    with pytest.raises(MessageRejectedError) as caught:
        result_row(bad, utcnow())
    assert str(caught.value).startswith("result: prediction"), str(caught.value)
    assert "\n" not in str(caught.value)


def _service(mosquitto: Mosquitto, tmp_path: Path, **ingest: Any) -> Any:
    from deploy.collector.config import load_collector_config
    from deploy.collector.service import ArchiveService

    config = load_collector_config(
        environ={},
        overrides={
            "mqtt": {"broker": mosquitto.url, "client_id": "archive-w"},
            "http": {"port": free_port()},
            "ingest": {"watchdog_s": 0.2, **ingest},
        },
    )
    return ArchiveService(config, tmp_path / "state")


def _run_until_it_fails(service: Any, timeout: float) -> BaseException | None:
    import threading

    failure: list[BaseException] = []

    def run() -> None:
        try:
            service.run(threading.Event())
        except BaseException as exc:  # the watchdog's ServiceError
            failure.append(exc)

    runner = threading.Thread(target=run, daemon=True)
    runner.start()
    runner.join(timeout)
    return failure[0] if failure else None


def test_watchdog_fails_the_run_when_the_network_thread_dies(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    from deploy.exceptions import ServiceError

    service = _service(mosquitto, tmp_path)
    service.start()
    try:
        assert service.subscriber.subscribed.wait(10)
        service.subscriber._client.loop_stop()  # paho's network thread ends, as if it crashed
        failure = _run_until_it_fails(service, 10)
        assert isinstance(failure, ServiceError) and "network thread" in str(failure)
    finally:
        service.close()


def test_watchdog_fails_the_run_when_the_writer_is_stuck(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    import threading

    from deploy.exceptions import ServiceError

    service = _service(mosquitto, tmp_path, stuck_after_s=0.5)
    service.start()
    release = threading.Event()
    try:
        store = service.subscriber.store
        real = store.add_results
        store.add_results = lambda rows, prefix: (release.wait(30), real(rows, prefix))[1]
        assert service.subscriber.subscribed.wait(10)
        publish(mosquitto.port, TOPIC, json.dumps(make_result(1, device=DEVICE)))
        failure = _run_until_it_fails(service, 10)
        assert isinstance(failure, ServiceError) and "stuck" in str(failure)
    finally:
        release.set()
        service.close()


def test_a_message_the_database_keeps_refusing_is_set_aside_after_bounded_tries(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    import threading

    from deploy.exceptions import ArchiveError

    service = _service(mosquitto, tmp_path, storage_tries=3, retry_min_s=0.05, retry_max_s=0.1)
    service.start()
    stop = threading.Event()
    runner = threading.Thread(target=service.run, args=(stop,), daemon=True)
    runner.start()
    try:
        sub = service.subscriber
        real = sub.store.add_results

        def refuse_one(rows: list[dict[str, Any]], prefix: str) -> list[str]:
            if any(r["slide_id"] == "REFUSED" for r in rows):
                raise ArchiveError("simulated: this row always fails")
            return real(rows, prefix)

        sub.store.add_results = refuse_one
        assert sub.subscribed.wait(10)
        bad = make_result(1, device=DEVICE, slide="REFUSED")
        good = [make_result(seq, device=DEVICE) for seq in (2, 3)]
        for result in (bad, *good):
            publish(mosquitto.port, TOPIC, json.dumps(result))
        assert wait_until(lambda: sub.stored == 2 and sub.rejected == 1, 20)
        kept = service.subscriber.store.engine
        from deploy.collector.queries import ArchiveQueries

        item = ArchiveQueries(kept).rejected()["items"][0]
        assert item["kind"] == "storage" and item["message_id"] == bad["message_id"]
        assert "simulated" in item["reason"]
        assert sub.storage_errors >= 3
    finally:
        stop.set()
        runner.join(10)
        service.close()


def test_a_stuck_writer_makes_omis_collect_exit_non_zero_and_nothing_is_lost(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    """The process-level watchdog: a database call that does not return (here SQLite held
    locked by another process, longer than ``ingest.stuck_after_s``) makes ``omis collect``
    exit non-zero with one line, for its supervisor to restart it; the unacknowledged result
    is redelivered to the next process and stored."""
    import os
    import sqlite3
    import sys

    from collector_support import ROOT

    db_path = tmp_path / "archive.sqlite"
    db_url = f"sqlite:///{db_path}"
    env = dict(
        os.environ,
        PYTHONPATH=str(ROOT),
        OMIS_COLLECT_INGEST__STUCK_AFTER_S="1",
        OMIS_COLLECT_INGEST__WATCHDOG_S="0.2",
    )
    argv = [
        sys.executable, "-m", "deploy.cli", "collect", "--broker", mosquitto.url,
        "--db", db_url, "--client-id", "archive-stuck", "--http", "127.0.0.1:0",
        "--state-dir", str(tmp_path / "state"),
    ]  # fmt: skip
    proc = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True, env=env)
    try:
        assert wait_until(lambda: "Sending SUBACK to archive-stuck" in mosquitto.log_text(), 60)
        lock = sqlite3.connect(db_path, isolation_level=None)
        lock.execute("BEGIN IMMEDIATE")  # every write of the collector now waits (30 s)
        result = make_result(1, device=DEVICE)
        publish(mosquitto.port, TOPIC, json.dumps(result))
        assert proc.wait(30) != 0
        assert proc.stderr is not None
        last = [line for line in proc.stderr.read().splitlines() if line.strip()][-1]
        assert "watchdog" in last and "stuck" in last, last
        lock.execute("ROLLBACK")
        lock.close()
        proc = subprocess.Popen(argv, stderr=subprocess.DEVNULL, text=True, env=env)

        def stored() -> bool:
            with sqlite3.connect(f"file:{db_path}?mode=ro", uri=True) as db:
                query = "SELECT COUNT(*) FROM results WHERE message_id = ?"
                return bool(db.execute(query, (result["message_id"],)).fetchone()[0])

        assert wait_until(stored, 60)
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(15)
