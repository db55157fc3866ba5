"""Reading the archive: filtered, paged result lists, one result, devices, alerts."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, Engine, Select, func, select

from deploy.collector.tables import alerts, devices, rejected, results

LIST_COLUMNS = (
    results.c.message_id,
    results.c.device_id,
    results.c.boot_id,
    results.c.seq,
    results.c.slide_id,
    results.c.scan_id,
    results.c.started_at,
    results.c.finished_at,
    results.c.received_at,
    results.c.outcome,
    results.c.outcome_reason,
    results.c.outcome_stage,
    results.c.review,
    results.c.label,
    results.c.risk,
    results.c.p_high,
    results.c.model_name,
    results.c.model_version,
    results.c.model_sha256,
)
# what the list endpoints read: the listed columns plus the bounded sort time
_ROW_COLUMNS = (*LIST_COLUMNS, results.c.sort_at)
# newest first by the device's finished_at bounded by the archive's clock (see
# deploy.collector.store.bounded_time): a device clock in the future cannot pin a result on top
NEWEST_FIRST = (results.c.sort_at.desc(), results.c.id.desc())


def rfc3339(value: datetime | None) -> str | None:
    """Naive UTC as RFC 3339 with milliseconds and ``Z``."""
    return None if value is None else value.isoformat(timespec="milliseconds") + "Z"


@dataclass(frozen=True)
class ResultFilter:
    """The filters of ``GET /api/results`` (None = any)."""

    device: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    outcome: str | None = None
    risk: str | None = None
    review: bool | None = None
    slide: str | None = None

    def apply(self, query: Select[Any]) -> Select[Any]:
        """``query`` narrowed by every filter that is set."""
        c = results.c
        conditions: list[ColumnElement[bool]] = []
        if self.device is not None:
            conditions.append(c.device_id == self.device)
        if self.since is not None:
            conditions.append(c.finished_at >= self.since)
        if self.until is not None:
            conditions.append(c.finished_at < self.until)
        if self.outcome is not None:
            conditions.append(c.outcome == self.outcome)
        if self.risk is not None:
            conditions.append(c.risk == self.risk)
        if self.review is not None:
            conditions.append(c.review == self.review)
        if self.slide is not None:
            needle = self.slide.lower()
            conditions.append(func.lower(c.slide_id).contains(needle, autoescape=True))
        return query.where(*conditions) if conditions else query


def summary(row: Any) -> dict[str, Any]:
    """One list row as JSON; ``device_clock_ahead`` when finished_at had to be bounded."""
    data = dict(row._mapping)
    sort_at = data.pop("sort_at")
    data["device_clock_ahead"] = sort_at < data["finished_at"]
    for key in ("started_at", "finished_at", "received_at"):
        data[key] = rfc3339(data[key])
    data["review"] = bool(data["review"])
    return data


class ArchiveQueries:
    """The read side of the archive."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def list_results(
        self, where: ResultFilter, limit: int, offset: int = 0
    ) -> tuple[int, list[dict[str, Any]]]:
        """(total matching, one page newest first)."""
        page = where.apply(select(*_ROW_COLUMNS)).order_by(*NEWEST_FIRST)
        total = where.apply(select(func.count()).select_from(results))
        with self.engine.connect() as conn:
            count = int(conn.execute(total).scalar_one())
            rows = conn.execute(page.limit(limit).offset(offset)).all()
        return count, [summary(r) for r in rows]

    def iter_results(self, where: ResultFilter, chunk: int = 1000) -> Iterator[dict[str, Any]]:
        """Every matching row, newest first, streamed from one query (CSV export)."""
        query = where.apply(select(*_ROW_COLUMNS)).order_by(*NEWEST_FIRST)
        with self.engine.connect() as conn:
            rows = conn.execution_options(yield_per=chunk).execute(query)
            for row in rows:
                yield summary(row)

    def get_result(self, message_id: str) -> dict[str, Any] | None:
        """The full stored payload plus the archive's columns, or None."""
        query = select(*_ROW_COLUMNS, results.c.payload).where(results.c.message_id == message_id)
        with self.engine.connect() as conn:
            row = conn.execute(query).first()
        if row is None:
            return None
        data = summary(row)
        payload = json.loads(data.pop("payload"))
        return {"archive": data, "result": payload}

    def devices(self) -> list[dict[str, Any]]:
        """Every known device with its live state and result count."""
        counts = (
            select(results.c.device_id, func.count().label("results"))
            .group_by(results.c.device_id)
            .subquery()
        )
        query = (
            select(devices, func.coalesce(counts.c.results, 0).label("results"))
            .outerjoin(counts, counts.c.device_id == devices.c.device_id)
            .order_by(devices.c.device_id)
        )
        with self.engine.connect() as conn:
            rows = conn.execute(query).all()
        out = []
        for row in rows:
            data = dict(row._mapping)
            for key in ("status", "ota_state"):
                data[key] = json.loads(data[key]) if data[key] else None
            for key in ("availability_at", "last_result_at", "updated_at"):
                data[key] = rfc3339(data[key])
            data.pop("status_at")
            data.pop("status_time")
            out.append(data)
        return out

    def alerts(
        self, *, open_only: bool = False, device: str | None = None, limit: int = 200
    ) -> list[dict[str, Any]]:
        """Alerts, newest first."""
        query = select(alerts).order_by(alerts.c.created_at.desc(), alerts.c.id.desc())
        if open_only:
            query = query.where(alerts.c.resolved_at.is_(None))
        if device is not None:
            query = query.where(alerts.c.device_id == device)
        with self.engine.connect() as conn:
            rows = conn.execute(query.limit(limit)).all()
        out = []
        for row in rows:
            data = dict(row._mapping)
            data["created_at"] = rfc3339(data["created_at"])
            data["resolved_at"] = rfc3339(data["resolved_at"])
            data.pop("key")
            out.append(data)
        return out

    def rejected(
        self, *, device: str | None = None, limit: int = 100, offset: int = 0
    ) -> dict[str, Any]:
        """Messages set aside, newest first: bytes as received (base64), topic, reason, time.

        ``by_device`` counts every rejected message per device (``null``: not known).
        """
        query = select(rejected)
        counted = select(rejected.c.device_id, func.count().label("n")).group_by(
            rejected.c.device_id
        )
        if device is not None:
            query = query.where(rejected.c.device_id == device)
        newest = query.order_by(rejected.c.received_at.desc(), rejected.c.id.desc())
        with self.engine.connect() as conn:
            rows = conn.execute(newest.limit(limit).offset(offset)).all()
            counts = {r.device_id: int(r.n) for r in conn.execute(counted)}
        total = counts.get(device, 0) if device is not None else sum(counts.values())
        items = []
        for row in rows:
            data = dict(row._mapping)
            raw = bytes(data.pop("payload"))
            data["received_at"] = rfc3339(data["received_at"])
            data["payload_base64"] = base64.b64encode(raw).decode("ascii")
            data["size"] = len(raw)
            items.append(data)
        by_device = {str(k) if k is not None else "(unknown)": v for k, v in counts.items()}
        return {
            "total": total,
            "limit": limit,
            "offset": offset,
            "items": items,
            "by_device": by_device,
        }
