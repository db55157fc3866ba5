"""A thread that re-evaluates the performance and drift alerts every few minutes."""

from __future__ import annotations

import logging
import threading

from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError

from deploy.collector.loop_api import LoopSettings
from deploy.collector.performance import PerformanceQuery, performance, raise_alerts

log = logging.getLogger(__name__)


class PerformanceMonitor:
    """Runs :func:`check` now and then every ``interval_s`` until :meth:`close`."""

    def __init__(self, engine: Engine, settings: LoopSettings, interval_s: float) -> None:
        self.engine = engine
        self.settings = settings
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def check(self) -> int:
        """Evaluate every model version with a baseline; returns the open alerts."""
        report = performance(
            self.engine, PerformanceQuery(), self.settings.baselines, self.settings.limits
        )
        return raise_alerts(self.engine, report)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                n = self.check()
                log.debug("performance check: %d open alert(s)", n)
            except SQLAlchemyError as exc:  # storage trouble: try again next round
                log.warning("performance check failed: %s", exc)
            self._stop.wait(self.interval_s)

    def start(self) -> PerformanceMonitor:
        """Start the thread."""
        self._thread = threading.Thread(target=self._run, name="collector-performance", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop the thread; idempotent."""
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(10)
