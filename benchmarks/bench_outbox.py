"""Results per second through the durable outbox to a real mosquitto (started here).

Usage: ``python benchmarks/bench_outbox.py [--n 1000] [--bundle B --slides 3]``

For each variant (synchronous FULL / NORMAL, inflight window) it commits N results to a fresh
outbox (commit rate), then starts the pump and measures until every row is acknowledged by the
broker and deleted (drain rate).  With ``--bundle`` it also times ``sim://`` slides end to end
(acquire -> classify -> commit -> PUBACK) through the real scanner.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
import uuid
from pathlib import Path

from deploy.broker import EmbeddedBroker
from deploy.config import MqttConfig, load_config
from deploy.mqtt import MqttLink, OutboxPump, Topics
from deploy.outbox import Outbox

PAYLOAD_BYTES = 6000  # about one omis.result/1 with a 256-bin spectrum


def one_variant(port: int, workdir: Path, n: int, sync: str, inflight: int) -> tuple[float, float]:
    box = Outbox(workdir / f"{sync}-{inflight}.db", max_rows=n + 1, synchronous=sync).open()  # type: ignore[arg-type]
    topics = Topics("bench/v1", f"b{inflight}{sync}")
    body = b"x" * PAYLOAD_BYTES
    t0 = time.perf_counter()
    for _ in range(n):
        box.put(str(uuid.uuid4()), topics.result, body)
    commit_s = time.perf_counter() - t0
    from deploy.broker import BrokerAddress

    link = MqttLink(
        MqttConfig(max_inflight=inflight), BrokerAddress("mqtt", "127.0.0.1", port), topics
    )
    pump = OutboxPump(box, link, inflight)
    link.on_puback = pump.on_puback
    link.start()
    link.wait_connected(10)
    stop = threading.Event()
    worker = threading.Thread(target=pump.run, args=(stop,))
    t0 = time.perf_counter()
    worker.start()
    pump.drain(120)
    drain_s = time.perf_counter() - t0
    stop.set()
    pump.notify()
    worker.join()
    link.close()
    box.close()
    return n / commit_s, n / drain_s


def end_to_end(bundle: str, slides: int, workdir: Path) -> list[float]:
    from deploy.appliance.base import ScanRequest
    from deploy.appliance.service import Appliance
    from deploy.scanner import MicroscopeScanner

    state = workdir / "e2e"
    config = load_config(environ={}, overrides={"device": {"id": "bench"}, "scan": {"fields": 4}})
    app = Appliance(config, state, MicroscopeScanner("sim://", Path(bundle), state))
    app.start()
    latencies = []
    try:
        for i in range(slides):
            t0 = time.perf_counter()
            app.run_batch([ScanRequest(f"sim0-{i:04d}", 4)], ack_timeout_s=30)
            latencies.append((time.perf_counter() - t0) * 1000)
    finally:
        app.shutdown()
    return latencies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--bundle")
    parser.add_argument("--slides", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, EmbeddedBroker() as broker:
        port = broker.address.port or 0
        print(f"{args.n} results of {PAYLOAD_BYTES} B through the outbox to mosquitto :{port}")
        print(f"{'synchronous':>12} {'inflight':>9} {'commit/s':>10} {'drain/s':>10}")
        rows = []
        for sync in ("full", "normal"):
            for inflight in (1, 20, 100):
                commit, drain = one_variant(port, Path(tmp), args.n, sync, inflight)
                rows.append({"sync": sync, "inflight": inflight, "commit": commit, "drain": drain})
                print(f"{sync:>12} {inflight:>9} {commit:>10.0f} {drain:>10.0f}")
        if args.bundle:
            lat = end_to_end(args.bundle, args.slides, Path(tmp))
            print(
                f"end-to-end sim:// slide (4 fields, incl. PUBACK): "
                f"median {sorted(lat)[len(lat) // 2]:.0f} ms, max {max(lat):.0f} ms"
            )
        print(json.dumps(rows, allow_nan=False))


if __name__ == "__main__":
    main()
