"""Database engines and migrations: SQLite (WAL, one writer at a time) or PostgreSQL (psycopg 3)."""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.exc import ArgumentError, SQLAlchemyError

from deploy.exceptions import ArchiveError

log = logging.getLogger(__name__)

MIGRATIONS = Path(__file__).resolve().parent / "migrations"
_PG_LOCK = 0x0A715_0001  # advisory lock id: one migrating instance at a time
SQLITE_BUSY_MS = 30000


def normalise_url(url: str) -> str:
    """``postgresql://`` means psycopg 3 (SQLAlchemy's plain default is psycopg2)."""
    if url.startswith(("postgresql://", "postgres://")):
        return "postgresql+psycopg://" + url.split("://", 1)[1]
    return url


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    dbapi_connection.isolation_level = None  # SQLAlchemy emits BEGIN itself (below)
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=FULL")  # an acknowledged result survives power loss
    cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_MS}")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA mmap_size=0")  # read the database with read(), never through a map
    cursor.close()


def _writable_file(path: Path) -> None:
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        return  # SQLite creates it
    if not stat.S_ISREG(mode):
        raise ArchiveError(f"db: {path} is not a regular file; move it away")
    if not os.access(path, os.R_OK | os.W_OK):
        raise ArchiveError(
            f"db: {path} is not writable; the archive needs to write the database and its "
            "-wal and -shm files (SQLite maps -shm into memory: an unwritable one can crash "
            "the process with SIGBUS); fix its owner or permissions, or remove it while no "
            "collector runs"
        )


def check_sqlite_files(database: Path) -> None:
    """Refuse, naming the file, what SQLite could not write: its directory (it creates -wal and
    -shm there), the database, ``-wal`` and ``-shm``; each must be a regular, writable file.

    SQLite maps ``-shm`` into memory; one it cannot extend turns into SIGBUS at the first
    access, which kills the process with no log line, so this runs before anything opens."""
    directory = database.parent
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ArchiveError(f"db: cannot create {directory}: {exc.strerror}") from exc
    if not os.access(directory, os.W_OK | os.X_OK):
        raise ArchiveError(
            f"db: {directory} is not writable; SQLite creates the database's -wal and -shm "
            "files beside it"
        )
    for suffix in ("", "-wal", "-shm"):
        _writable_file(Path(f"{database}{suffix}"))


def open_engine(url: str, *, writer: bool = True) -> Engine:
    """An engine for ``url``; SQLite writers take the write lock at BEGIN (no upgrade deadlock)."""
    if not url.startswith(("sqlite:", "postgresql:", "postgres:", "postgresql+psycopg:")):
        scheme = url.partition(":")[0]
        raise ArchiveError(f"db: {scheme!r} is not supported (sqlite:///PATH or postgresql://)")
    try:
        # A pre-ping notices a PostgreSQL restart; a local SQLite file needs none.
        engine = create_engine(normalise_url(url), pool_pre_ping=url.startswith("postgres"))
    except (ArgumentError, ImportError, ValueError) as exc:
        raise ArchiveError(f"db: cannot use {url!r}: {exc}") from exc
    if engine.dialect.name == "sqlite":
        database = engine.url.database
        if not database or database == ":memory:":
            raise ArchiveError("db: an in-memory SQLite database cannot be shared; give a path")
        check_sqlite_files(Path(database))
        event.listen(engine, "connect", _sqlite_pragmas)
        begin = "BEGIN IMMEDIATE" if writer else "BEGIN"
        event.listen(engine, "begin", lambda conn: conn.exec_driver_sql(begin))
    return engine


def migrate(engine: Engine) -> None:
    """Bring the schema to the newest Alembic revision (concurrent instances wait in turn)."""
    from alembic import command
    from alembic.config import Config as AlembicConfig

    logging.getLogger("alembic").setLevel(logging.WARNING)  # its INFO lines are per-plugin noise
    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    try:
        with engine.begin() as conn:
            if engine.dialect.name == "postgresql":
                conn.execute(text("SELECT pg_advisory_xact_lock(:id)"), {"id": _PG_LOCK})
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "head")
    except SQLAlchemyError as exc:
        raise ArchiveError(f"db: cannot migrate {engine.url!r}: {exc}") from exc
    log.debug("database %s at the newest revision", engine.url)
