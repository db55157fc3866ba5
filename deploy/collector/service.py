"""``omis collect`` as one object: database, MQTT session, HTTP server; start, run, close.

Start-up is a list of short steps (open the database and migrate it, connect to the broker,
bind the HTTP socket); :meth:`ArchiveService.close` undoes whatever was started, in reverse.
"""

from __future__ import annotations

import logging
import socket
import threading
from pathlib import Path
from types import TracebackType

import uvicorn
from sqlalchemy import Engine, make_url

from deploy.collector.api import create_app
from deploy.collector.config import CollectorConfig
from deploy.collector.db import migrate, normalise_url, open_engine
from deploy.collector.ingest import ArchiveSubscriber
from deploy.collector.loop_api import LoopSettings
from deploy.collector.monitor import PerformanceMonitor
from deploy.collector.queries import ArchiveQueries
from deploy.collector.store import ArchiveStore
from deploy.exceptions import ConfigError, ServiceError

log = logging.getLogger(__name__)

PACKAGED_DASHBOARD = Path(__file__).resolve().parent.parent / "dashboard"
# every package file the pages load (index.html, performance.html): scripts/dashboard-deps.sh
VENDORED = tuple(
    Path("node_modules") / name
    for name in (
        "mqtt/dist/mqtt.min.js",
        "uplot/dist/uPlot.iife.min.js",
        "uplot/dist/uPlot.min.css",
    )
)


def dashboard_dir(config: CollectorConfig) -> Path | None:
    """The static dashboard to serve: configured, else the packaged one if its deps are in."""
    configured = config.http.dashboard_dir
    if configured is not None:
        if not (configured / "index.html").is_file():
            raise ConfigError(f"http.dashboard_dir: no index.html in {configured}")
        return configured
    if all((PACKAGED_DASHBOARD / path).is_file() for path in VENDORED):
        return PACKAGED_DASHBOARD
    log.warning("dashboard not served: run scripts/dashboard-deps.sh to install its packages")
    return None


class ArchiveService:
    """The result archive: MQTT in, database, HTTP out."""

    def __init__(self, config: CollectorConfig, state_dir: Path) -> None:
        self.config = config
        self.db_url = config.database_url(state_dir)
        self.engines: list[Engine] = []
        self.subscriber: ArchiveSubscriber | None = None
        self._server: uvicorn.Server | None = None
        self._http_thread: threading.Thread | None = None
        self._socket: socket.socket | None = None
        self.monitor: PerformanceMonitor | None = None
        self.loop: LoopSettings | None = None

    @property
    def db_display(self) -> str:
        """The database URL without its password."""
        return make_url(normalise_url(self.db_url)).render_as_string(hide_password=True)

    @property
    def http_url(self) -> str:
        """http://host:port/ of the bound API (after :meth:`start`)."""
        if self._socket is None:
            raise ServiceError("the HTTP API is not bound yet")
        host, port = self._socket.getsockname()[:2]
        return f"http://{'[' + host + ']' if ':' in host else host}:{port}/"

    def start(self) -> None:
        """Open and migrate the database, connect to the broker, serve HTTP."""
        writer = open_engine(self.db_url)
        self.engines.append(writer)
        migrate(writer)
        reader = open_engine(self.db_url, writer=False)
        self.engines.append(reader)
        store = ArchiveStore(writer, high_risk_alerts=self.config.high_risk_alerts)
        self.subscriber = ArchiveSubscriber(self.config.mqtt, store, self.config.ingest)
        self.subscriber.start()
        loop = LoopSettings.from_config(self.config, writer)
        self.loop = loop
        if loop.baselines:
            self.monitor = PerformanceMonitor(
                writer, loop, self.config.performance.check_interval_s
            ).start()
        self._serve_http(ArchiveQueries(reader), writer, loop)
        log.info("archive %s; API on %s", writer.url, self.http_url)

    def _serve_http(self, queries: ArchiveQueries, writer: Engine, loop: LoopSettings) -> None:
        http = self.config.http
        family = socket.AF_INET6 if ":" in http.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((http.host, http.port))
        except OSError as exc:
            sock.close()
            raise ServiceError(f"http: cannot listen on {http.host}:{http.port}: {exc}") from exc
        self._socket = sock
        app = create_app(
            queries,
            http,
            dashboard_dir(self.config),
            engine=writer,
            review=self.config.review,
            prefix=self.config.mqtt.prefix,
            loop=loop,
            commands=self.subscriber,
        )
        # log_config=None: uvicorn's records go through our (redacting) handler, not its own
        config = uvicorn.Config(app, log_level="warning", access_log=False, log_config=None)
        server = uvicorn.Server(config)
        self._server = server
        self._http_thread = threading.Thread(
            target=server.run, kwargs={"sockets": [sock]}, name="collector-http", daemon=True
        )
        self._http_thread.start()

    def run(self, stop: threading.Event) -> None:
        """Serve until ``stop`` is set."""
        if self.subscriber is None:
            raise ServiceError("start() first")
        self.subscriber.run(stop)

    def close(self) -> None:
        """Stop HTTP, disconnect, dispose of the engines; idempotent."""
        server, self._server = self._server, None
        if server is not None:
            server.should_exit = True
        thread, self._http_thread = self._http_thread, None
        if thread is not None:
            thread.join(10)
        sock, self._socket = self._socket, None
        if sock is not None:
            sock.close()
        monitor, self.monitor = self.monitor, None
        if monitor is not None:
            monitor.close()
        subscriber, self.subscriber = self.subscriber, None
        if subscriber is not None:
            subscriber.close()
        for engine in self.engines:
            engine.dispose()
        self.engines.clear()

    def __enter__(self) -> ArchiveService:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
