"""Crash-safe file writes: a temporary file in the same directory, fsync, then ``os.replace``.

Readers therefore see either the old file or the complete new one, never a half-written one.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some filesystems do not allow opening directories
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes, mode: int = 0o666) -> Path:
    """Write ``data`` to ``path`` atomically and durably; returns the path.

    The file gets ``mode`` masked by the umask, like a plain ``open()`` would give it
    (``mkstemp`` alone would leave it 0600); pass ``0o600`` for secrets.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        os.fchmod(fd, mode & ~_umask())
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(target.parent)
    return target


def atomic_write_text(path: str | os.PathLike[str], text: str, mode: int = 0o666) -> Path:
    """Write UTF-8 ``text`` to ``path`` atomically and durably."""
    return atomic_write_bytes(path, text.encode("utf-8"), mode)


def pid_alive(pid: int) -> bool:
    """True when a process ``pid`` exists (also one of another user)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_partials(target: str | os.PathLike[str]) -> list[Path]:
    """Remove ``.<name>.<pid>.*.partial`` siblings of ``target`` whose process is gone.

    Temporary siblings are removed on every failure path a process can see (exceptions,
    SIGINT, SIGTERM); a SIGKILL leaves one behind, which the next run cleans up here.
    """
    target = Path(target)
    removed: list[Path] = []
    for tmp in target.parent.glob(f".{target.name}.*.partial"):
        pid_text = tmp.name[len(target.name) + 2 :].split(".", 1)[0]
        if pid_text.isdigit() and int(pid_text) != os.getpid() and not pid_alive(int(pid_text)):
            shutil.rmtree(tmp, ignore_errors=True)
            removed.append(tmp)
    return removed


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Build a directory under a temporary name and move it into place only on success.

    The target must not exist yet (an existing directory is never half-overwritten).
    On any exception the temporary directory is removed and the target stays absent.
    """
    target = Path(path)
    if target.exists():
        raise FileExistsError(f"{target} already exists")
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(target)
    prefix = f".{target.name}.{os.getpid()}."
    tmp = Path(tempfile.mkdtemp(prefix=prefix, suffix=".partial", dir=target.parent))
    try:
        yield tmp
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(target.parent)
