"""What the outbox's storage-fault defences cost per commit, as ratios measured in one run.

Usage: ``python benchmarks/bench_outbox_locking.py [--n 500] [--rounds 5]``

Variants, interleaved round by round so that machine load hits them alike (the load average
is printed): the outbox as shipped (``locking_mode=EXCLUSIVE`` before WAL: the WAL index in the
heap, no ``-shm`` to SIGBUS on; plus the file-identity ``stat`` before every write), and the
previous configuration (WAL with a memory-mapped ``-shm``, no identity check).  Both commit
6 kB results with ``synchronous=FULL``.  Prints a table and a JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import statistics
import tempfile
import time
import uuid
from pathlib import Path

from deploy.outbox import Outbox

PAYLOAD_BYTES = 6000


def shipped(workdir: Path, n: int) -> float:
    """Commits per second through :class:`Outbox` as shipped."""
    box = Outbox(workdir / f"shipped-{uuid.uuid4().hex}.db", max_rows=n + 1).open()
    body = b"x" * PAYLOAD_BYTES
    t0 = time.perf_counter()
    for _ in range(n):
        box.put(uuid.uuid4().hex, "t", body)
    rate = n / (time.perf_counter() - t0)
    box.close()
    return rate


def previous(workdir: Path, n: int) -> float:
    """Commits per second with the earlier settings (shared WAL index, no identity check)."""
    db = sqlite3.connect(workdir / f"previous-{uuid.uuid4().hex}.db", isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.execute(
        "CREATE TABLE outbox (id INTEGER PRIMARY KEY AUTOINCREMENT, message_id TEXT NOT NULL "
        "UNIQUE, topic TEXT NOT NULL, payload BLOB NOT NULL, created_at REAL NOT NULL)"
    )
    body = b"x" * PAYLOAD_BYTES
    t0 = time.perf_counter()
    for _ in range(n):
        db.execute(
            "INSERT INTO outbox (message_id, topic, payload, created_at) VALUES (?, ?, ?, ?) "
            "ON CONFLICT(message_id) DO NOTHING",
            (uuid.uuid4().hex, "t", body, time.time()),
        )
    rate = n / (time.perf_counter() - t0)
    db.close()
    return rate


def main() -> None:
    """Run the rounds and print the table and a JSON line."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=500, help="commits per variant and round")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds")
    args = ap.parse_args()
    rates: dict[str, list[float]] = {"shipped": [], "previous": []}
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="omis-bench-locking-") as tmp:
        for _ in range(args.rounds):
            rates["previous"].append(previous(Path(tmp), args.n))
            rates["shipped"].append(shipped(Path(tmp), args.n))
    ratios = [s / p for s, p in zip(rates["shipped"], rates["previous"], strict=True)]
    out = {
        "n": args.n,
        "rounds": args.rounds,
        "load_avg_1m": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
        "median_commits_per_s": {k: round(statistics.median(v)) for k, v in rates.items()},
        "median_ratio_shipped_over_previous": round(statistics.median(ratios), 3),
    }
    print(f"load average (1 min) before/after: {out['load_avg_1m']}")
    print("| variant | median commits / s |")
    print("|---|---|")
    for name, values in rates.items():
        print(f"| {name} | {round(statistics.median(values)):,} |")
    ratio = out["median_ratio_shipped_over_previous"]
    print(f"shipped / previous (median of per-round ratios): {ratio}")
    print(json.dumps(out, allow_nan=False))


if __name__ == "__main__":
    main()
