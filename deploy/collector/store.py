"""Writing the archive: results exactly once, seq-gap alerts, live device state.

Every method is one transaction; it returns only after the commit, so the MQTT side may
acknowledge the message then.  Results of one boot are serialised on that boot's row
(``SELECT ... FOR UPDATE`` on PostgreSQL, ``BEGIN IMMEDIATE`` on SQLite), which keeps the
seq-gap bookkeeping right when several collectors share the load.
"""

from __future__ import annotations

import json
import logging
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import Connection, Engine, and_, delete, func, insert, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import SQLAlchemyError

from deploy.collector.alerting import check_reused_seq, gap_text, raise_high_risk
from deploy.collector.outcome import outcome_of, p_high
from deploy.collector.qcsample import qc_rank
from deploy.collector.tables import alerts, boots, devices, results
from deploy.exceptions import ArchiveError

log = logging.getLogger(__name__)


def utcnow() -> datetime:
    """Now as naive UTC (the storage convention)."""
    return datetime.now(timezone.utc).replace(tzinfo=None)


def parse_time(text: str) -> datetime:
    """RFC 3339 (``Z`` or an offset) to naive UTC; ``ValueError`` if it is not one."""
    value = datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
    if value.tzinfo is None:
        raise ValueError(f"{text!r} has no time zone")
    return value.astimezone(timezone.utc).replace(tzinfo=None)


def result_row(result: dict[str, Any], received_at: datetime) -> dict[str, Any]:
    """The indexed columns of one result (``ValueError``/``KeyError`` if it is malformed)."""
    outcome = outcome_of(result)
    prediction = result.get("prediction") or {}
    model = result.get("model") or {}
    return {
        "message_id": str(result["message_id"]),
        "device_id": str(result["device_id"]),
        "boot_id": str(result["boot_id"]),
        "seq": int(result["seq"]),
        "slide_id": str(result["slide_id"]),
        "scan_id": str(result["scan_id"]),
        "started_at": parse_time(result["started_at"]),
        "finished_at": parse_time(result["finished_at"]),
        "received_at": received_at,
        "outcome": outcome.kind,
        "outcome_reason": outcome.reason,
        "outcome_stage": outcome.stage,
        "review": outcome.review,
        "label": prediction.get("label"),
        "risk": prediction.get("risk"),
        "p_high": p_high(result),
        "model_name": model.get("name"),
        "model_version": model.get("version"),
        "model_sha256": model.get("sha256"),
        "payload": json.dumps(result, separators=(",", ":"), allow_nan=False),
        "qc_rank": qc_rank(str(result["message_id"])),
    }


class ArchiveStore:
    """The write side of the archive on one engine (see :func:`deploy.collector.db.open_engine`)."""

    def __init__(self, engine: Engine, *, high_risk_alerts: bool = True) -> None:
        self.engine = engine
        self.high_risk_alerts = high_risk_alerts

    def _insert_ignore(self, table: Any, key: list[str], values: dict[str, Any]) -> Any:
        dialect = postgresql if self.engine.dialect.name == "postgresql" else sqlite
        return dialect.insert(table).values(**values).on_conflict_do_nothing(index_elements=key)

    def add_result(self, result: dict[str, Any]) -> bool:
        """Store one result; False if its ``message_id`` is already stored (a redelivery)."""
        row = result_row(result, utcnow())
        try:
            with self.engine.begin() as conn:
                insert_row = self._insert_ignore(results, ["message_id"], row)
                if conn.execute(insert_row.returning(results.c.id)).first() is None:
                    return False  # already stored: a redelivery
                self._track_seq(conn, row)
                self._touch_device(conn, row["device_id"], last_result_at=row["received_at"])
                if self.high_risk_alerts and row["risk"] == "high" and not row["review"]:
                    raise_high_risk(conn, row, self._alert)
        except SQLAlchemyError as exc:
            raise ArchiveError(f"cannot store result {row['message_id']}: {exc}") from exc
        return True

    def _track_seq(self, conn: Connection, row: dict[str, Any]) -> None:
        device, boot, seq = row["device_id"], row["boot_id"], row["seq"]
        conn.execute(
            self._insert_ignore(
                boots,
                ["device_id", "boot_id"],
                {"device_id": device, "boot_id": boot, "max_seq": 0, "first_seen": utcnow()},
            )
        )
        mine = and_(boots.c.device_id == device, boots.c.boot_id == boot)
        max_seq = conn.execute(select(boots.c.max_seq).where(mine).with_for_update()).scalar_one()
        conn.execute(update(boots).where(mine).values(max_seq=max(max_seq, seq)))
        check_reused_seq(conn, row, self._alert)
        same_boot = and_(alerts.c.device_id == device, alerts.c.boot_id == boot)
        gap = conn.execute(
            select(alerts.c.id, alerts.c.seq_from, alerts.c.seq_to).where(
                same_boot,
                alerts.c.kind == "seq_gap",
                alerts.c.resolved_at.is_(None),
                alerts.c.seq_from <= seq,
                alerts.c.seq_to >= seq,
            )
        ).first()
        if gap is not None:  # a late arrival fills (part of) a gap: split what is still missing
            conn.execute(update(alerts).where(alerts.c.id == gap.id).values(resolved_at=utcnow()))
            self._gap(conn, device, boot, gap.seq_from, seq - 1)
            self._gap(conn, device, boot, seq + 1, gap.seq_to)
            return
        previous = conn.execute(
            select(func.max(results.c.seq)).where(
                results.c.device_id == device, results.c.boot_id == boot, results.c.seq < seq
            )
        ).scalar()
        self._gap(conn, device, boot, (previous or 0) + 1, seq - 1)

    def _gap(self, conn: Connection, device: str, boot: str, first: int, last: int) -> None:
        if first > last:
            return
        self._alert(
            conn,
            f"seq_gap:{device}:{boot}:{first}-{last}:{utcnow().isoformat()}",
            "seq_gap",
            device,
            gap_text(conn, device, boot, first, last),
            boot_id=boot,
            seq_from=first,
            seq_to=last,
        )

    def _alert(
        self, conn: Connection, key: str, kind: str, device: str, detail: str, **extra: Any
    ) -> None:
        values = {"key": key, "kind": kind, "device_id": device, "detail": detail, **extra}
        conn.execute(self._insert_ignore(alerts, ["key"], {**values, "created_at": utcnow()}))

    def _touch_device(self, conn: Connection, device: str, **values: Any) -> None:
        now = utcnow()
        conn.execute(
            self._insert_ignore(devices, ["device_id"], {"device_id": device, "updated_at": now})
        )
        conn.execute(
            update(devices).where(devices.c.device_id == device).values(updated_at=now, **values)
        )

    def set_availability(self, device: str, value: str) -> None:
        """``online``/``stopped``/``offline``; empty = decommissioned (the device is removed)."""
        now = utcnow()
        try:
            with self.engine.begin() as conn:
                if not value:
                    self._forget(conn, device)
                    return
                conn.execute(
                    self._insert_ignore(
                        devices, ["device_id"], {"device_id": device, "updated_at": now}
                    )
                )
                changed = conn.execute(
                    update(devices)
                    .where(
                        devices.c.device_id == device,
                        (devices.c.availability != value) | devices.c.availability.is_(None),
                    )
                    .values(availability=value, availability_at=now, updated_at=now)
                ).rowcount
                if not changed:  # the same state again (another instance, a retained copy)
                    return
                if value == "offline":
                    key = f"offline:{device}:{now.isoformat()}"
                    self._alert(conn, key, "offline", device, f"{device} went offline")
                else:
                    self._resolve(conn, device, "offline", now)
        except SQLAlchemyError as exc:
            raise ArchiveError(f"cannot store availability of {device}: {exc}") from exc

    def _resolve(self, conn: Connection, device: str, kind: str | None, now: datetime) -> None:
        where = [alerts.c.device_id == device, alerts.c.resolved_at.is_(None)]
        if kind is not None:
            where.append(alerts.c.kind == kind)
        conn.execute(update(alerts).where(*where).values(resolved_at=now))

    def _forget(self, conn: Connection, device: str) -> None:
        conn.execute(delete(devices).where(devices.c.device_id == device))
        self._resolve(conn, device, "offline", utcnow())
        log.info("device %s decommissioned (retained availability cleared)", device)

    def set_status(self, device: str, status: dict[str, Any] | None) -> None:
        """The retained status (None: cleared); an older ``at`` never overwrites a newer one."""
        at = str(status.get("at", "")) if status else None
        body = json.dumps(status, allow_nan=False) if status else None
        try:
            with self.engine.begin() as conn:
                if status:  # a cleared status (decommissioning) must not re-create the device
                    self._touch_device(conn, device)
                newer = (devices.c.status_at.is_(None)) | (devices.c.status_at <= (at or ""))
                where = [devices.c.device_id == device] + ([newer] if status else [])
                conn.execute(update(devices).where(*where).values(status=body, status_at=at))
        except SQLAlchemyError as exc:
            raise ArchiveError(f"cannot store status of {device}: {exc}") from exc

    def set_ota_state(self, device: str, state: dict[str, Any] | None) -> None:
        """The retained model-store state (None: cleared)."""
        body = json.dumps(state, allow_nan=False) if state else None
        try:
            with self.engine.begin() as conn:
                if state:
                    self._touch_device(conn, device, ota_state=body)
                else:
                    mine = devices.c.device_id == device
                    conn.execute(update(devices).where(mine).values(ota_state=None))
        except SQLAlchemyError as exc:
            raise ArchiveError(f"cannot store ota state of {device}: {exc}") from exc

    def count(self) -> int:
        """Results stored."""
        with self.engine.connect() as conn:
            return int(conn.execute(select(func.count()).select_from(results)).scalar_one())

    def insert_many(self, rows: list[dict[str, Any]]) -> None:
        """Bulk-load pre-built result rows (benchmarks and fixtures; no alerts)."""
        with self.engine.begin() as conn:
            conn.execute(insert(results), rows)
