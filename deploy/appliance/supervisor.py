"""Worker threads under a supervisor with a restart-rate cap (Frigate's watchdog pattern).

A worker is a function ``target(stop_event)`` that runs until the event is set.  If it raises
or returns early, :meth:`Supervisor.check` restarts it; more than ``max_restarts`` restarts of
all workers within ``window_s`` raise :class:`~deploy.exceptions.ServiceError`.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from deploy.exceptions import ServiceError

log = logging.getLogger(__name__)

Target = Callable[[threading.Event], None]


@dataclass
class _Worker:
    name: str
    target: Target
    thread: threading.Thread | None = None
    failures: int = 0
    last_error: str | None = None


@dataclass
class Supervisor:
    """Starts, watches and restarts named worker threads."""

    max_restarts: int = 5
    window_s: float = 300.0
    restarts: collections.deque[float] = field(default_factory=collections.deque)
    _workers: dict[str, _Worker] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)

    def add(self, name: str, target: Target) -> None:
        """Register a worker (before :meth:`start`)."""
        self._workers[name] = _Worker(name, target)

    def _run(self, worker: _Worker) -> None:
        try:
            worker.target(self._stop)
        except Exception as exc:
            worker.failures += 1
            worker.last_error = f"{type(exc).__name__}: {exc}"
            log.exception("worker %s failed", worker.name)

    def _spawn(self, worker: _Worker) -> None:
        worker.thread = threading.Thread(
            target=self._run, args=(worker,), name=f"omis-{worker.name}", daemon=True
        )
        worker.thread.start()

    def start(self) -> None:
        """Start every registered worker."""
        for worker in self._workers.values():
            self._spawn(worker)

    def dead(self) -> list[str]:
        """Names of workers that are not running although nobody asked them to stop."""
        if self._stop.is_set():
            return []
        return [
            w.name for w in self._workers.values() if w.thread is None or not w.thread.is_alive()
        ]

    def check(self) -> None:
        """Restart dead workers, or raise :class:`ServiceError` past the restart-rate cap."""
        now = time.monotonic()
        while self.restarts and now - self.restarts[0] > self.window_s:
            self.restarts.popleft()
        for name in self.dead():
            worker = self._workers[name]
            if len(self.restarts) >= self.max_restarts:
                raise ServiceError(
                    f"worker {name} failed {len(self.restarts) + 1} times within "
                    f"{self.window_s:.0f} s (last: {worker.last_error})"
                )
            self.restarts.append(now)
            log.warning("restarting worker %s (last error: %s)", name, worker.last_error)
            self._spawn(worker)

    @property
    def last_error(self) -> str | None:
        """The most recent worker error, if any."""
        errors = [w.last_error for w in self._workers.values() if w.last_error]
        return errors[-1] if errors else None

    def stop(self, timeout_s: float = 5.0) -> None:
        """Ask every worker to stop and join them (idempotent)."""
        self._stop.set()
        deadline = time.monotonic() + timeout_s
        for worker in self._workers.values():
            if worker.thread is not None:
                worker.thread.join(max(0.0, deadline - time.monotonic()))
                if worker.thread.is_alive():
                    log.warning("worker %s did not stop in time", worker.name)
