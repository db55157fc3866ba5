"""Test support for ``omis collect``: a real PostgreSQL cluster, collector processes, results.

* :func:`postgres_server` (session fixture ``postgres``) -- Debian's PostgreSQL (``postgresql``
  package, ``scripts/system-deps.sh --test``): ``initdb`` into a temporary directory as the
  ``postgres`` user (when run as root), on a free port, stopped at the end of the session.
  :meth:`PostgresServer.new_database` gives each test its own database.
* :func:`database_url` (fixture ``db_url``, parametrised ``sqlite`` / ``postgresql``).
* :func:`collector_child` -- ``omis collect`` in its own process (for SIGKILL tests).
* :func:`make_result` -- a valid ``omis.result/1`` from the device's builders
  (:mod:`deploy.messages.testing`).
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from deploy.broker import free_port
from deploy.messages.testing import result_json
from deploy.messages.vocabulary import OUTCOMES

PG_BIN = Path("/usr/lib/postgresql")
ROOT = Path(__file__).resolve().parent.parent
SHA = "cd" * 32


def _pg_bin(name: str) -> str:
    found = sorted(PG_BIN.glob(f"*/bin/{name}"))
    if not found:
        raise RuntimeError(f"PostgreSQL's {name} not found: run scripts/system-deps.sh --test")
    return str(found[-1])


class PostgresServer:
    """A throw-away PostgreSQL cluster on 127.0.0.1:<free port>, trust authentication."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="omis-pg-"))
        self.data = self.dir / "data"
        self.port = free_port()
        self.as_root = os.getuid() == 0
        self.count = 0

    def _run(self, *argv: str) -> None:
        cmd = ["runuser", "-u", "postgres", "--", *argv] if self.as_root else list(argv)
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(argv[:2])} failed: {done.stderr[-800:]}")

    def start(self) -> PostgresServer:
        """initdb and start; waits until it accepts connections."""
        if self.as_root:
            user = pwd.getpwnam("postgres")
            os.chown(self.dir, user.pw_uid, user.pw_gid)
        self._run(_pg_bin("initdb"), "-D", str(self.data), "-A", "trust", "-U", "postgres")
        return self.launch()

    def launch(self) -> PostgresServer:
        """Start the (initialised) cluster; waits until it accepts connections."""
        options = f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off"
        log = str(self.dir / "postgres.log")
        self._run(_pg_bin("pg_ctl"), "-D", str(self.data), "-o", options, "-l", log, "-w", "start")
        return self

    def url(self, database: str = "postgres") -> str:
        """postgresql://postgres@127.0.0.1:PORT/DATABASE."""
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def new_database(self) -> str:
        """A fresh, empty database; its URL."""
        import psycopg

        self.count += 1
        name = f"omis_test_{self.count}_{uuid.uuid4().hex[:8]}"
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def halt(self) -> None:
        """Stop the server, keeping the cluster (``launch`` starts it again)."""
        self._run(_pg_bin("pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop")

    def stop(self) -> None:
        """Stop the cluster and delete it."""
        with contextlib.suppress(RuntimeError):
            self._run(_pg_bin("pg_ctl"), "-D", str(self.data), "-m", "immediate", "stop")
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(name="postgres", scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """One PostgreSQL cluster for the test session."""
    server = PostgresServer().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(name="db_url", params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty archive database: SQLite under tmp_path, or a new PostgreSQL database."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'archive.sqlite'}"
    server: PostgresServer = request.getfixturevalue("postgres")
    return server.new_database()


def make_result(
    seq: int,
    *,
    device: str = "scope-07",
    boot: str = "boot-1",
    slide: str | None = None,
    p_high: float = 0.2,
    abstained: bool = False,
    finished_at: str = "2026-01-01T12:00:00.000Z",
    **extra: Any,
) -> dict[str, Any]:
    """A valid ``omis.result/1``, built by the device's own builders.

    ``outcome``/``reason``/``stage`` choose the report (an unknown outcome is written over the
    built payload, to test refusals); any other ``extra`` key is written over the payload too.
    """
    kw: dict[str, Any] = {}
    if extra.get("outcome") in OUTCOMES:
        kw = {k: extra.pop(k) for k in ("outcome", "reason", "stage") if k in extra}
    body = result_json(
        seq,
        device=device,
        boot=boot,
        slide=slide,
        p_high=p_high,
        abstained=abstained,
        finished_at=finished_at,
        model={"name": "omis-test", "version": 4, "sha256": SHA},
        **kw,
    )
    body.update(extra)
    return body


def collector_child(
    broker_url: str, db_url: str, client_id: str, state_dir: Path, http_port: int = 0
) -> subprocess.Popen[str]:
    """``omis collect`` in its own process; stderr says ``API and dashboard on`` when up."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
    argv = [
        sys.executable, "-m", "deploy.cli", "collect", "--broker", broker_url, "--db", db_url,
        "--client-id", client_id, "--http", f"127.0.0.1:{http_port}",
        "--state-dir", str(state_dir),
    ]  # fmt: skip
    return subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )
