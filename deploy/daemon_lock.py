"""One daemon per state directory: an exclusive ``flock`` held for the daemon's lifetime.

Two daemons on one state directory share the outbox, the model store and the device id, and
knock each other off the broker.  ``omis serve`` takes ``<state-dir>/run/daemon.lock`` before
anything else and holds it until it exits (the kernel drops it on any exit, even a kill, so a
stale lock cannot block a restart).  The file holds the holder's pid, for the refusal message.
"""

from __future__ import annotations

import fcntl
import logging
import os
from pathlib import Path
from types import TracebackType

from deploy.exceptions import ServiceError

log = logging.getLogger(__name__)

LOCK_FILE = Path("run") / "daemon.lock"


class DaemonLockedError(ServiceError):
    """Another daemon holds the state directory's lock; the message names it and its pid."""


class DaemonLock:
    """The state directory's daemon lock (no I/O until :meth:`acquire`); a context manager."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = Path(state_dir)
        self.path = self.state_dir / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock now or raise :class:`DaemonLockedError` naming the holder's pid."""
        if self._fd is not None:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise ServiceError(f"state dir {self.state_dir}: {exc.strerror}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_pid(fd)
            os.close(fd)
            raise DaemonLockedError(
                f"state dir {self.state_dir} is in use by another omis serve "
                f"(pid {holder or 'unknown'}); stop it first or use another --state-dir"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        log.debug("daemon lock %s taken (pid %d)", self.path, os.getpid())

    def release(self) -> None:
        """Let go of the lock (idempotent); the pid file stays, harmless once unlocked."""
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)  # closing releases the flock

    def __enter__(self) -> DaemonLock:
        self.acquire()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None
