"""The archive's authentication under a password-guessing flood: a viewer's latency.

Usage: ``python benchmarks/bench_auth.py [--requests 40] [--attackers 16] [--repeats 3]``

A real uvicorn server (``create_app`` over SQLite) on a free port; a viewer sends
``GET /api/me`` with HTTP Basic (the correct password) one request after another, alone and
while ``--attackers`` clients — each from its own loopback address (127.0.0.2, …) — send
wrong passwords as fast as they can.  Two configurations in the same run:

* ``limits``: the shipped defaults (10 failures per client and minute, 2 hashes at once,
  verified credentials remembered);
* ``no limits``: failures unlimited, 64 hashes at once, the viewer's credentials never
  remembered (every request hashes): the collector before issue 20.

Prints median and p95 latency and the flooded/alone ratio per configuration, and the load
average, so the numbers can be read against the machine's other work.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import uvicorn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from deploy.collector import auth as auth_module  # noqa: E402
from deploy.collector.api import create_app  # noqa: E402
from deploy.collector.audit import Actor  # noqa: E402
from deploy.collector.auth import UserStore  # noqa: E402
from deploy.collector.config import HttpConfig  # noqa: E402
from deploy.collector.db import migrate, open_engine  # noqa: E402
from deploy.collector.queries import ArchiveQueries  # noqa: E402

PASSWORD = "viewer's pass"


def _serve(app: Any) -> tuple[uvicorn.Server, threading.Thread, int]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="error", access_log=False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    return server, thread, port


def _viewer(port: int, n: int) -> list[float]:
    times = []
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", auth=("viewer", PASSWORD)) as api:
        for _ in range(n):
            start = time.perf_counter()
            assert api.get("/api/me").status_code == 200
            times.append((time.perf_counter() - start) * 1000)
    return times


def _attacker(port: int, address: str, stop: threading.Event) -> None:
    transport = httpx.HTTPTransport(local_address=address)
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", transport=transport) as api:
        i = 0
        while not stop.is_set():
            i += 1
            api.get("/api/me", auth=("viewer", f"guess-{i}"))


def _measure(port: int, n: int, attackers: int) -> list[float]:
    stop = threading.Event()
    threads = [
        threading.Thread(target=_attacker, args=(port, f"127.0.0.{2 + i}", stop), daemon=True)
        for i in range(attackers)
    ]
    for thread in threads:
        thread.start()
    time.sleep(0.5 if attackers else 0)
    try:
        return _viewer(port, n)
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)


def _stats(times: list[float]) -> tuple[float, float]:
    ordered = sorted(times)
    return statistics.median(ordered), ordered[int(0.95 * (len(ordered) - 1))]


def run(config: HttpConfig, remember: bool, n: int, attackers: int, db: str) -> dict[str, Any]:
    engine = open_engine(db)
    app = create_app(ArchiveQueries(engine), config, None)
    if not remember:  # the old behaviour: every request pays the KDF
        auth_module.Authenticator._cached = lambda self, key: False  # type: ignore[method-assign]
    server, thread, port = _serve(app)
    try:
        alone = _measure(port, n, 0)
        flooded = _measure(port, n, attackers)
    finally:
        server.should_exit = True
        thread.join(10)
        engine.dispose()
    return {"alone": _stats(alone), "flooded": _stats(flooded)}


def main() -> int:
    """Run both configurations ``--repeats`` times and print a table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=40, help="viewer requests per run")
    parser.add_argument("--attackers", type=int, default=16, help="guessing clients")
    parser.add_argument("--repeats", type=int, default=3, help="runs per configuration")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-auth-"))
    db = f"sqlite:///{tmp / 'a.sqlite'}"
    engine = open_engine(db)
    migrate(engine)
    UserStore(engine).add("viewer", "viewer", PASSWORD, Actor("bench"))
    engine.dispose()
    original = auth_module.Authenticator._cached
    variants = {
        "limits": (HttpConfig(), True),
        "no limits": (HttpConfig(auth_failures_per_minute=100000, kdf_concurrency=64), False),
    }
    print(f"load average before: {os.getloadavg()}")
    print(
        "| configuration | viewer alone, median / p95 (ms) "
        "| with guessing clients, median / p95 (ms) | ratio of medians |"
    )
    print("|---|---|---|---|")
    for name, (config, remember) in variants.items():
        for _ in range(args.repeats):
            auth_module.Authenticator._cached = original  # type: ignore[method-assign]
            found = run(config, remember, args.requests, args.attackers, db)
            (a_med, a_p95), (f_med, f_p95) = found["alone"], found["flooded"]
            print(
                f"| {name} | {a_med:.1f} / {a_p95:.1f} | {f_med:.1f} / {f_p95:.1f} "
                f"| {f_med / a_med:.1f} |"
            )
    print(f"load average after: {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
