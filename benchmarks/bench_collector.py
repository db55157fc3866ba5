"""The result archive (``omis collect``): ingest rate and query latency, SQLite vs PostgreSQL.

Usage: ``python benchmarks/bench_collector.py [--n 2000] [--month] [--pg URL | --pg-temp]``

* ingest, store: results per second through ``ArchiveStore.add_results``, one transaction per
  result (what the collector did before) and per batch of 20 (the shipped broker's
  ``max_inflight_messages``) and of 200 (``ingest.batch_max``); values checked, seq tracking
  and alerts on.  The ratio batch/single is measured in the same run.
* ingest, MQTT: results per second from a real mosquitto (started here) through the collector's
  subscriber (shared subscription, batched commits, manual acks after commit, receipts) into
  the database.
* idle (``--idle S``): CPU of an idle ``omis collect`` process over S seconds
  (``/proc/<pid>/stat``), as a share of one core.

Each ingest figure is the median of ``--repeat`` runs; the load average is printed with it.
* query (``--month``): one busy device's month, 40 slides/h x 24 h x 30 days = 28,800 results
  with a 256-bin spectrum, bulk-loaded; then the API's queries, median and p95 of repeats.
"""

from __future__ import annotations

import argparse
import json
import os
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


def ingest_store(url: str, n: int, batch: int) -> float:
    """Results/s through the write side, ``batch`` results per transaction (rows built inside)."""
    engine = open_engine(url)
    migrate(engine)
    store = ArchiveStore(engine)
    start = datetime(2026, 1, 1, tzinfo=timezone.utc)
    bodies = [make(i + 1, start + timedelta(seconds=i)) for i in range(n)]
    t0 = time.perf_counter()
    for first in range(0, n, batch):
        now = datetime.now(timezone.utc).replace(tzinfo=None)
        store.add_results([result_row(body, now) for body in bodies[first : first + batch]])
    rate = n / (time.perf_counter() - t0)
    engine.dispose()
    return rate


def idle_cpu(url: str, port: int, seconds: float) -> float:
    """Share of one core an idle ``omis collect`` process uses over ``seconds``."""
    from broker_support import wait_until
    from collector_support import collector_child

    with tempfile.TemporaryDirectory() as state:
        proc = collector_child(f"mqtt://127.0.0.1:{port}", url, "bench-idle", Path(state))
        try:
            assert proc.stderr is not None
            for line in proc.stderr:
                if "API and dashboard on" in line:
                    break
            else:
                raise RuntimeError("omis collect did not start")
            wait_until(lambda: False, 3.0)  # let start-up work settle before measuring
            tick = os.sysconf("SC_CLK_TCK")

            def cpu() -> float:
                fields = Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
                return (int(fields[11]) + int(fields[12])) / tick  # utime + stime

            before, t0 = cpu(), time.monotonic()
            time.sleep(seconds)
            return (cpu() - before) / (time.monotonic() - t0)
        finally:
            proc.terminate()
            proc.wait(15)


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
        time.sleep(0.05)
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


def ingest_line(kind: str, url: Callable[[], str], args: Any, port: int | None) -> str:
    """One table row: the store at three batch sizes and via MQTT, medians of the repeats."""

    def median(run: Callable[[], float]) -> float:
        return statistics.median(run() for _ in range(args.repeat))

    single, twenty, batched = (
        median(lambda b=size: ingest_store(url(), args.n, b))  # type: ignore[misc]
        for size in (1, 20, 200)
    )
    mqtt_rate = median(lambda: ingest_mqtt(url(), args.n, port or 0))
    return (
        f"| {kind} | {single:.0f} | {twenty:.0f} | {batched:.0f} | "
        f"{batched / single:.1f}x | {mqtt_rate:.0f} |"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000, help="results per ingest run")
    parser.add_argument("--month", action="store_true", help="also the month-of-a-device queries")
    parser.add_argument("--repeats", type=int, default=20, help="query repeats")
    parser.add_argument("--pg", help="postgresql://... (an empty database to use)")
    parser.add_argument("--pg-temp", action="store_true", help="start a throw-away PostgreSQL")
    parser.add_argument("--repeat", type=int, default=1, help="ingest runs (median reported)")
    parser.add_argument("--idle", type=float, default=0.0, help="seconds of idle CPU to measure")
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
            print(f"ingest, {args.n} results each, median of {args.repeat} run(s)")
            print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}\n")
            print(
                "| database | 1 per transaction (results/s) | 20 per transaction | "
                "200 per transaction | 200 / 1 | via MQTT (results/s) |"
            )
            print("|---|---|---|---|---|---|")
            for kind in kinds:
                print(ingest_line(kind, lambda k=kind: fresh_url(k, work, pg), args, broker.port))
            print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
            if args.idle:
                print(f"\nidle omis collect over {args.idle:.0f} s\n")
                print("| database | CPU (% of one core) |\n|---|---|")
                for kind in kinds:
                    share = idle_cpu(fresh_url(kind, work, pg), broker.port or 0, args.idle)
                    print(f"| {kind} | {100 * share:.2f} |", flush=True)
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
