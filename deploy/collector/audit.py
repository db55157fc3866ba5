"""The audit trail: every write through the API or the CLI appended, never changed.

One function writes (:func:`record`, inside the caller's transaction, so the change and its
record commit together); one reads (:func:`read_audit`).  There is no update or delete.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, Engine, func, insert, select

from deploy.collector.queries import rfc3339
from deploy.collector.store import utcnow
from deploy.collector.tables import audit


@dataclass(frozen=True)
class Actor:
    """Who did it: a user name, role and the client address (None for the CLI)."""

    name: str
    role: str | None = None
    client: str | None = None


def record(
    conn: Connection, actor: Actor, action: str, target: str | None, detail: dict[str, Any]
) -> None:
    """Append one entry (in ``conn``'s transaction)."""
    conn.execute(
        insert(audit).values(
            at=utcnow(),
            user_name=actor.name[:64],
            role=actor.role,
            action=action,
            target=None if target is None else target[:300],
            detail=json.dumps(
                detail, ensure_ascii=False, sort_keys=True, default=str, allow_nan=False
            ),
            client=None if actor.client is None else actor.client[:64],
        )
    )


def record_now(
    engine: Engine, actor: Actor, action: str, target: str | None, detail: dict[str, Any]
) -> None:
    """Append one entry in its own transaction (e.g. a failed login, which changes nothing)."""
    with engine.begin() as conn:
        record(conn, actor, action, target, detail)


@dataclass(frozen=True)
class AuditFilter:
    """Filters of ``GET /api/audit`` (None = any)."""

    action: str | None = None
    user: str | None = None
    target: str | None = None
    since: datetime | None = None
    until: datetime | None = None


def read_audit(
    engine: Engine, where: AuditFilter, limit: int, offset: int
) -> tuple[int, list[dict[str, Any]]]:
    """(total, one page newest first)."""
    c = audit.c
    conditions = [
        cond
        for cond in (
            None if where.action is None else c.action == where.action,
            None if where.user is None else c.user_name == where.user,
            None if where.target is None else c.target == where.target,
            None if where.since is None else c.at >= where.since,
            None if where.until is None else c.at < where.until,
        )
        if cond is not None
    ]
    page = select(audit).where(*conditions).order_by(c.id.desc()).limit(limit).offset(offset)
    with engine.connect() as conn:
        total = int(
            conn.execute(select(func.count()).select_from(audit).where(*conditions)).scalar_one()
        )
        rows = conn.execute(page).all()
    items = []
    for row in rows:
        data = dict(row._mapping)
        data["at"] = rfc3339(data["at"])
        data["detail"] = json.loads(data["detail"])
        items.append(data)
    return total, items
