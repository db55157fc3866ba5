"""Database engines and migrations: SQLite (WAL, one writer at a time) or PostgreSQL (psycopg 3)."""

from __future__ import annotations

import logging
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
    cursor.close()


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
        Path(database).parent.mkdir(parents=True, exist_ok=True)
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
            command.upgrade(cfg, "heads")  # branches revising 0001 until the lead chains them
    except SQLAlchemyError as exc:
        raise ArchiveError(f"db: cannot migrate {engine.url!r}: {exc}") from exc
    log.debug("database %s at the newest revision", engine.url)
