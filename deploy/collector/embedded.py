"""The archive inside another process (``omis demo``): SQLite, a free HTTP port, a thread."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import func, select

from deploy.collector.config import load_collector_config
from deploy.collector.service import ArchiveService, dashboard_dir
from deploy.collector.tables import results
from deploy.exceptions import ServiceError


@dataclass
class EmbeddedArchive:
    """A running :class:`ArchiveService` and what a caller needs from it."""

    service: ArchiveService
    dashboard: bool

    @property
    def url(self) -> str:
        """The dashboard URL when the page is served, else the API's result list."""
        base = self.service.http_url
        return base if self.dashboard else f"{base}api/results"

    def count(self, message_ids: set[str]) -> int:
        """How many of ``message_ids`` are stored."""
        engine = self.service.engines[0]
        query = select(func.count()).where(results.c.message_id.in_(message_ids))
        with engine.connect() as conn:
            return int(conn.execute(query).scalar_one())

    def wait_for(self, message_ids: set[str], timeout_s: float) -> int:
        """Wait until every id is stored (or the timeout); returns how many are."""
        deadline = time.monotonic() + timeout_s
        while (stored := self.count(message_ids)) < len(message_ids):
            if time.monotonic() > deadline:
                break
            time.sleep(0.1)
        return stored


@contextmanager
def embedded_archive(
    directory: Path,
    broker_port: int,
    http: str = "127.0.0.1:0",
    dashboard_broker_url: str | None = None,
    overrides: dict[str, Any] | None = None,
) -> Iterator[EmbeddedArchive]:
    """Run an archive on ``directory/collector.sqlite`` against a local broker; its dashboard
    connects to ``dashboard_broker_url`` (the broker's WebSockets listener); ``overrides``: more
    configuration, e.g. accounts."""
    host, _, port = http.rpartition(":")
    config = load_collector_config(
        environ={},
        overrides={
            "mqtt": {"broker": f"mqtt://127.0.0.1:{broker_port}", "client_id": "omis-demo-archive"},
            "http": {
                "host": host,
                "port": int(port),
                "dashboard_broker_url": dashboard_broker_url,
                **(overrides or {}).get("http", {}),
            },
            **{k: v for k, v in (overrides or {}).items() if k != "http"},
        },
    )
    service = ArchiveService(config, directory)
    stop = threading.Event()
    runner = threading.Thread(target=service.run, args=(stop,), name="demo-archive", daemon=True)
    try:
        service.start()
        runner.start()
        subscriber = service.subscriber
        if subscriber is None or not subscriber.subscribed.wait(10):
            raise ServiceError(f"the archive could not subscribe on port {broker_port}")
        yield EmbeddedArchive(service, dashboard_dir(config) is not None)
    finally:
        stop.set()
        if runner.is_alive():
            runner.join(10)
        service.close()
