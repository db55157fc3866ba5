"""The result archive (``omis collect``): ingest rate and query latency, SQLite vs PostgreSQL.

Usage: ``python benchmarks/bench_collector.py [--n 2000] [--month] [--pg URL | --pg-temp]``

* ingest, store: results per second through ``ArchiveStore.add_result`` (one transaction per
  result, as the collector commits before each acknowledgement; seq tracking and alerts on).
* ingest, MQTT: results per second from a real mosquitto (started here) through the collector's
  subscriber (shared subscription, manual acks after commit) into the database.
* query (``--month``): one busy device's month, 40 slides/h x 24 h x 30 days = 28,800 results
  with a 256-bin spectrum, bulk-loaded; then the API's queries, median and p95 of repeats.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # PostgresServer: a throw-away cluster (--pg-temp)

from deploy.broker import EmbeddedBroker  # noqa: E402
from deploy.collector.config import CollectorMqtt  # noqa: E402
from deploy.collector.db import migrate, open_engine  # noqa: E402
from deploy.collector.fhir import diagnostic_bundle  # noqa: E402
from deploy.collector.ingest import ArchiveSubscriber  # noqa: E402
from deploy.collector.queries import ArchiveQueries, ResultFilter  # noqa: E402
from deploy.collector.store import ArchiveStore, result_row  # noqa: E402
from deploy.messages.testing import result_json  # noqa: E402

BINS = 256
MONTH = 40 * 24 * 30


def make(seq: int, at: datetime, device: str = "scope-07", boot: str = "boot-1") -> dict[str, Any]:
    """A realistic result (about 6 kB with the spectrum), built by the device's builders."""
    p = (seq * 7919 % 1000) / 1000
    stamp = at.isoformat(timespec="milliseconds").replace("+00:00", "Z")
    return result_json(
        seq,
        device=device,
        boot=boot,
        slide=f"S-{seq:06d}",
        scan=uuid.uuid4().hex,
        p_high=p,
        abstained=0.45 <= p < 0.55,
        started_at=stamp,
        finished_at=stamp,
        model={"name": "omis-binary", "version": 7, "sha256": "ab" * 32},
        fields=[{"index": i, "valid_fraction": 0.9, "quality": "ok"} for i in range(8)],
        axis=[round(-145 + i * 290 / (BINS - 1), 3) for i in range(BINS)],
        values=[round(1e-3 * ((i * 37) % 101), 6) for i in range(BINS)],
        timings_ms={"acquire": 310.2, "spectrum": 41.0, "infer": 6.3, "total": 420.5},
    )


def fresh_url(kind: str, workdir: Path, pg: Any) -> str:
    if kind == "sqlite":
        return f"sqlite:///{workdir / f'{uuid.uuid4().hex}.sqlite'}"
    return str(pg())


def ingest_store(url: str, n: int) -> float:
    engine = open_engine(url)
    migrate(engine)
    store = ArchiveStore(engine)
    start = datetime(2026, 1, 1, tzinfo=timezone.utc)
    bodies = [make(i + 1, start + timedelta(seconds=i)) for i in range(n)]
    t0 = time.perf_counter()
    for body in bodies:
        store.add_result(body)
    rate = n / (time.perf_counter() - t0)
    engine.dispose()
    return rate


def ingest_mqtt(url: str, n: int, port: int) -> float:
    engine = open_engine(url)
    migrate(engine)
    store = ArchiveStore(engine)
    tag = uuid.uuid4().hex[:8]
    cfg = CollectorMqtt(
        broker=f"mqtt://127.0.0.1:{port}",
        client_id=f"bench-{tag}",
        group=f"bench-{tag}",  # its own group: an earlier run's session would keep a share
    )
    subscriber = ArchiveSubscriber(cfg, store)
    subscriber.start()
    subscriber.subscribed.wait(10)
    start = datetime(2026, 1, 1, tzinfo=timezone.utc)
    device = f"dev-{uuid.uuid4().hex[:6]}"
    payloads = [
        json.dumps(make(i + 1, start + timedelta(seconds=i), device), allow_nan=False)
        for i in range(n)
    ]
    pub = paho.Client(CallbackAPIVersion.VERSION2, protocol=MQTTProtocolVersion.MQTTv5)
    pub.max_inflight_messages_set(100)
    pub.connect("127.0.0.1", port)
    pub.loop_start()
    t0 = time.perf_counter()
    for body in payloads:
        pub.publish(f"omis/v1/{device}/result", body, qos=1)
    while store.count() < n:
        time.sleep(0.01)
    rate = n / (time.perf_counter() - t0)
    pub.disconnect()
    pub.loop_stop()
    subscriber.close()
    engine.dispose()
    return rate


def timed(fn: Callable[[], Any], repeats: int) -> tuple[float, float]:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000)
    times.sort()
    return statistics.median(times), times[min(len(times) - 1, int(0.95 * len(times)))]


def month_queries(url: str, repeats: int) -> list[tuple[str, float, float]]:
    engine = open_engine(url)
    migrate(engine)
    store = ArchiveStore(engine)
    start = datetime(2026, 1, 1, tzinfo=timezone.utc)
    received = datetime(2026, 2, 1)
    rows = [
        result_row(make(i + 1, start + timedelta(seconds=90 * i)), received) for i in range(MONTH)
    ]
    other = [
        result_row(make(i + 1, start + timedelta(seconds=90 * i), "scope-08"), received)
        for i in range(MONTH // 4)
    ]
    t0 = time.perf_counter()
    for chunk in range(0, len(rows), 2000):
        store.insert_many(rows[chunk : chunk + 2000])
    store.insert_many(other)
    load_s = time.perf_counter() - t0
    q = ArchiveQueries(open_engine(url, writer=False))
    day = ResultFilter(device="scope-07", since=datetime(2026, 1, 15), until=datetime(2026, 1, 16))
    some = rows[MONTH // 2]["message_id"]
    cases: list[tuple[str, Callable[[], Any]]] = [
        ("newest 100 of the device", lambda: q.list_results(ResultFilter(device="scope-07"), 100)),
        ("one day of the device (960)", lambda: q.list_results(day, 1000)),
        (
            "needs review, page of 100",
            lambda: q.list_results(ResultFilter(device="scope-07", review=True), 100),
        ),
        ("slide id search", lambda: q.list_results(ResultFilter(slide="S-014400"), 100)),
        (
            "page 200 (offset 20,000)",
            lambda: q.list_results(ResultFilter(device="scope-07"), 100, 20000),
        ),
        ("one result + FHIR", lambda: diagnostic_bundle(q.get_result(some) or {})),
        (
            "CSV of the month (28,800 rows)",
            lambda: sum(1 for _ in q.iter_results(ResultFilter(device="scope-07"))),
        ),
    ]
    out = [("bulk load (rows/s)", len(rows + other) / load_s, 0.0)]
    for name, fn in cases:
        reps = 3 if name.startswith("CSV") else repeats
        median, p95 = timed(fn, reps)
        out.append((name, median, p95))
    engine.dispose()
    q.engine.dispose()
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000, help="results per ingest run")
    parser.add_argument("--month", action="store_true", help="also the month-of-a-device queries")
    parser.add_argument("--repeats", type=int, default=20, help="query repeats")
    parser.add_argument("--pg", help="postgresql://... (an empty database to use)")
    parser.add_argument("--pg-temp", action="store_true", help="start a throw-away PostgreSQL")
    args = parser.parse_args()
    kinds = ["sqlite"]
    server = None
    pg: Any = None
    if args.pg_temp:
        from collector_support import PostgresServer

        server = PostgresServer().start()
        pg = server.new_database
    elif args.pg:
        pg = lambda: args.pg  # noqa: E731
    if pg is not None:
        kinds.append("postgresql")
    try:
        with tempfile.TemporaryDirectory() as tmp, EmbeddedBroker() as broker:
            work = Path(tmp)
            print(f"ingest, {args.n} results each\n")
            print("| database | store (results/s) | via MQTT (results/s) |\n|---|---|---|")
            for kind in kinds:
                store_rate = ingest_store(fresh_url(kind, work, pg), args.n)
                mqtt_rate = ingest_mqtt(fresh_url(kind, work, pg), args.n, broker.port or 0)
                print(f"| {kind} | {store_rate:.0f} | {mqtt_rate:.0f} |", flush=True)
            if args.month:
                print(f"\nqueries on a month of one busy device ({MONTH} results + 7,200 more)\n")
                print(
                    "| query | "
                    + " | ".join(f"{k} median (ms) | {k} p95 (ms)" for k in kinds)
                    + " |"
                )
                print("|---|" + "---|---|" * len(kinds))
                columns = [month_queries(fresh_url(k, work, pg), args.repeats) for k in kinds]
                for i, (name, *_rest) in enumerate(columns[0]):
                    cells = " | ".join(f"{c[i][1]:.1f} | {c[i][2]:.1f}" for c in columns)
                    print(f"| {name} | {cells} |")
    finally:
        if server is not None:
            server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
