"""A bounded scan queue: one scan runs at a time, a few wait, any can be cancelled."""

from __future__ import annotations

import collections
import threading

from deploy.appliance.base import ScanRequest
from deploy.exceptions import ScanRejectedError


class ScanQueue:
    """FIFO of waiting scans plus the one running now; thread-safe."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._waiting: collections.deque[ScanRequest] = collections.deque()
        self._current: ScanRequest | None = None
        self._cancel = threading.Event()
        self._cond = threading.Condition()
        self._closed = False

    def put(self, request: ScanRequest) -> int:
        """Queue a scan; returns its position (0 = next).  Raises ScanRejectedError."""
        with self._cond:
            if self._closed:
                raise ScanRejectedError("the appliance is stopping", "stopping")
            if len(self._waiting) >= self.capacity:
                raise ScanRejectedError(f"scan queue full ({self.capacity} waiting)", "queue_full")
            self._waiting.append(request)
            self._cond.notify_all()
            return len(self._waiting) - 1

    def get(self, timeout_s: float) -> ScanRequest | None:
        """Take the next scan and make it current; None after ``timeout_s`` without one."""
        with self._cond:
            if not self._waiting:
                self._cond.wait(timeout_s)
            if not self._waiting or self._closed:
                return None
            self._current = self._waiting.popleft()
            self._cancel = threading.Event()
            return self._current

    @property
    def cancel_event(self) -> threading.Event:
        """The cancel flag of the current scan."""
        with self._cond:
            return self._cancel

    def done(self) -> None:
        """The current scan finished (or failed)."""
        with self._cond:
            self._current = None
            self._cond.notify_all()

    @property
    def current(self) -> ScanRequest | None:
        """The running scan, if any."""
        with self._cond:
            return self._current

    @property
    def depth(self) -> int:
        """Scans waiting (not counting the running one)."""
        with self._cond:
            return len(self._waiting)

    def cancel(self, scan_id: str | None = None) -> list[str]:
        """Cancel ``scan_id`` (queued or running), or the running scan when None.

        Returns what was cancelled: nothing for a scan that is already being cancelled.
        """
        with self._cond:
            if scan_id is None or (self._current and self._current.scan_id == scan_id):
                if self._current is None or self._cancel.is_set():
                    return []
                self._cancel.set()
                return [self._current.scan_id]
            kept = [r for r in self._waiting if r.scan_id != scan_id]
            if len(kept) == len(self._waiting):
                return []
            self._waiting = collections.deque(kept)
            return [scan_id]

    def close(self) -> list[ScanRequest]:
        """Refuse new scans; returns the dropped waiting ones."""
        with self._cond:
            self._closed = True
            dropped = list(self._waiting)
            self._waiting.clear()
            self._cond.notify_all()
            return dropped

    def wait_idle(self, timeout_s: float) -> bool:
        """True once nothing runs or waits, within ``timeout_s``."""
        with self._cond:
            return self._cond.wait_for(
                lambda: self._current is None and not self._waiting, timeout_s
            )
