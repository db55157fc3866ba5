"""Opening the scanner, and waiting for a microscope that is not there yet.

A microscope that is unplugged, powered off or still booting when the daemon starts is a
state of the device, not a reason to exit (under systemd an exit is a restart loop that says
nothing).  The service stays up and ``degraded`` (``scanner_unavailable``, the error naming the
port in ``last_error``), and :meth:`ScannerConnector.run` retries with exponential back-off
until the microscope answers; then the device is ``idle``.  Errors that retrying cannot fix (a
malformed microscope URL, a model that fails its gate) still stop the start-up.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from deploy.appliance.base import ScannerInfo, SlideScanner
from firmware_bridge.exceptions import BridgeError, InputError

log = logging.getLogger(__name__)


def is_missing_microscope(exc: BaseException) -> bool:
    """True for errors of a microscope that is absent or not answering (worth retrying)."""
    return isinstance(exc, BridgeError) and not isinstance(exc, InputError)


class ScannerConnector:
    """Opens ``scanner``; a missing microscope is retried by :meth:`run` (a supervised worker)."""

    def __init__(
        self,
        scanner: SlideScanner,
        on_open: Callable[[ScannerInfo], None],
        on_missing: Callable[[str], None],
        initial_s: float = 1.0,
        max_s: float = 60.0,
    ) -> None:
        self.scanner = scanner
        self.on_open = on_open
        self.on_missing = on_missing  # (one-line reason): the service reports it
        self.initial_s = initial_s
        self.max_s = max_s
        self.connected = threading.Event()

    def open(self) -> bool:
        """Try once (start-up): True when open; False when the microscope is missing; other
        errors propagate."""
        try:
            info = self.scanner.open()
        except BridgeError as exc:
            if not is_missing_microscope(exc):
                raise
            log.warning("microscope not available: %s", exc)
            self.on_missing(str(exc))
            return False
        self._opened(info)
        return True

    def _opened(self, info: ScannerInfo) -> None:
        self.connected.set()
        self.on_open(info)

    def run(self, stop: threading.Event) -> None:
        """Worker: retry with exponential back-off until open, then idle until ``stop``."""
        delay = self.initial_s
        while not self.connected.is_set() and not stop.wait(delay):
            try:
                info = self.scanner.open()
            except BridgeError as exc:
                if not is_missing_microscope(exc):
                    raise
                delay = min(delay * 2, self.max_s)
                log.warning("microscope still not available: %s; next try in %.1f s", exc, delay)
                self.on_missing(str(exc))
                continue
            log.info("microscope available: the scanner is open")
            self._opened(info)
        stop.wait()
