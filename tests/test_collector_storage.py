"""Storage faults of the collector's SQLite are one clear error and a clean exit (issue 20).

An unwritable ``-shm`` (SQLite maps it into memory) killed ``omis collect`` with SIGBUS and no
log line.  The database, ``-wal`` and ``-shm`` files and their directory are checked before
SQLite opens anything; the check names the file.  "Unwritable" is made real: ``chattr +i`` as
root (root ignores permission bits), read-only permission bits otherwise.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from collector_support import collector_child

from deploy.collector.db import migrate, open_engine
from deploy.exceptions import ArchiveError

SHM_BYTES = 32768  # one wal-index page group, as SQLite leaves it


@contextlib.contextmanager
def unwritable(path: Path) -> Iterator[None]:
    """``path`` cannot be written (nor, for a directory, have entries created) meanwhile."""
    if os.geteuid() == 0:
        subprocess.run(["chattr", "+i", str(path)], check=True, capture_output=True)
        try:
            yield
        finally:
            subprocess.run(["chattr", "-i", str(path)], check=True, capture_output=True)
    else:
        mode = path.stat().st_mode
        path.chmod(0o555 if path.is_dir() else 0o444)
        try:
            yield
        finally:
            path.chmod(mode)


def archive(tmp_path: Path) -> Path:
    db = tmp_path / "archive.sqlite"
    engine = open_engine(f"sqlite:///{db}")
    migrate(engine)
    engine.dispose()
    return db


def test_unwritable_shm_is_one_clear_error_and_a_clean_exit(tmp_path: Path) -> None:
    db = archive(tmp_path)
    shm = Path(f"{db}-shm")
    shm.write_bytes(b"\0" * SHM_BYTES)
    with unwritable(shm):
        child = collector_child("mqtt://127.0.0.1:1", f"sqlite:///{db}", "c1", tmp_path)
        try:
            _, err = child.communicate(timeout=60)
        finally:
            if child.poll() is None:
                child.kill()
    assert child.returncode == 1, err  # not -SIGBUS (-7), not a traceback
    errors = [line for line in err.splitlines() if "error" in line.lower()]
    assert len(errors) == 1, err
    assert f"{db}-shm" in errors[0] and "not writable" in errors[0], errors[0]


@pytest.mark.parametrize("which", ["-wal", "", "directory"])
def test_every_unwritable_sqlite_file_is_named_before_opening(tmp_path: Path, which: str) -> None:
    db = archive(tmp_path)
    target = tmp_path if which == "directory" else Path(f"{db}{which}")
    if which == "-wal":
        target.write_bytes(b"")
    with unwritable(target), pytest.raises(ArchiveError, match="not writable") as caught:
        open_engine(f"sqlite:///{db}")
    assert str(target) in str(caught.value)


def test_a_shm_that_is_not_a_file_is_refused(tmp_path: Path) -> None:
    db = archive(tmp_path)
    Path(f"{db}-shm").mkdir()
    with pytest.raises(ArchiveError, match="not a regular file"):
        open_engine(f"sqlite:///{db}")
