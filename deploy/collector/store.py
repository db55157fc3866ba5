"""Writing the archive: results exactly once, seq-gap alerts, live device state.

Every method is one transaction; it returns only after the commit, so the MQTT side may
acknowledge the message then.  Results of one boot are serialised on that boot's row
(``SELECT ... FOR UPDATE`` on PostgreSQL, ``BEGIN IMMEDIATE`` on SQLite), which keeps the
seq-gap bookkeeping right when several collectors share the load.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import Connection, Engine, and_, delete, func, insert, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import SQLAlchemyError

from deploy.collector import storable
from deploy.collector.alerting import check_reused_seq, gap_text, raise_high_risk
from deploy.collector.storable import MAX_CLOCK_SKEW, bounded_time
from deploy.collector.tables import alerts, boots, devices, rejected, results
from deploy.exceptions import ArchiveError
from deploy.fleet.view import record_ota_event

log = logging.getLogger(__name__)

STORED, DUPLICATE, CONFLICT = "stored", "duplicate", "conflict"
__all__ = ["MAX_CLOCK_SKEW", "bounded_time"]  # re-exported (defined in storable)


def utcnow() -> datetime:
    """Now as naive UTC (the storage convention)."""
    return datetime.now(timezone.utc).replace(tzinfo=None)


def parse_time(text: str) -> datetime:
    """RFC 3339 (``Z`` or an offset) to naive UTC; ``ValueError`` if it is not one."""
    value = datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
    if value.tzinfo is None:
        raise ValueError(f"{text!r} has no time zone")
    return value.astimezone(timezone.utc).replace(tzinfo=None)


def status_time(status: dict[str, Any], received_at: datetime) -> datetime:
    """The status's ``at`` parsed and bounded; ``received_at`` when it has none or a bad one."""
    try:
        return bounded_time(parse_time(str(status["at"])), received_at)
    except (KeyError, ValueError, OverflowError):
        return received_at


def result_row(result: dict[str, Any], received_at: datetime) -> dict[str, Any]:
    """The indexed columns of one result (:class:`MessageRejectedError` if it is not storable)."""
    device = result.get("device_id") if isinstance(result, dict) else None
    return storable.result_row(result, str(device), received_at)


def safe_text(value: str, limit: int = 2000) -> str:
    """``value`` shortened, without NUL or lone surrogates: storable as a reason in any DB."""
    cleaned = value.replace("\x00", "\\0")[:limit]
    return cleaned.encode("utf-8", "backslashreplace").decode("utf-8")


@dataclass(frozen=True)
class Rejection:
    """A message set aside: the bytes as received, where from, why."""

    topic: str
    payload: bytes
    reason: str
    kind: str = "data"  # data | storage | conflict
    device_id: str | None = None
    message_id: str | None = None


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
        return self.add_results([result_row(result, utcnow())])[0] == STORED

    def _dialect_insert(self, table: Any) -> Any:
        dialect = postgresql if self.engine.dialect.name == "postgresql" else sqlite
        return dialect.insert(table)

    def add_results(self, rows: Sequence[dict[str, Any]], prefix: str = "omis/v1") -> list[str]:
        """Store checked rows (:func:`storable.result_row`) in ONE transaction.

        Returns per row ``stored``, ``duplicate`` (the same content again: a redelivery) or
        ``conflict`` (the same ``message_id`` with other content: kept in ``rejected`` with an
        alert, the first copy stays).  Raises :class:`ArchiveError` (nothing committed).

        The statements are per batch, not per row: one multi-row insert, one seq bookkeeping
        per (device, boot), one insert of the alerts -- that is what makes ingest fast.
        """
        if not rows:
            return []
        try:
            with self.engine.begin() as conn:
                outcomes = self._add_rows(conn, rows, prefix)
        except SQLAlchemyError as exc:
            first = rows[0]["message_id"]
            raise ArchiveError(f"cannot store {len(rows)} result(s) from {first}: {exc}") from exc
        return outcomes

    def _add_rows(self, conn: Connection, rows: Sequence[dict[str, Any]], prefix: str) -> list[str]:
        insert_rows = (
            self._dialect_insert(results)
            .on_conflict_do_nothing(index_elements=["message_id"])
            .returning(results.c.message_id)
        )
        inserted = {r[0] for r in conn.execute(insert_rows, list(rows))}
        outcomes: list[str] = []
        fresh: list[dict[str, Any]] = []
        for row in rows:
            if row["message_id"] in inserted:
                inserted.discard(row["message_id"])  # a second copy in this batch is not new
                outcomes.append(STORED)
                fresh.append(row)
            else:
                topic = f"{prefix}/{row['device_id']}/result"
                outcomes.append(self._same_again(conn, row, topic))
        by_boot: dict[tuple[str, str], list[int]] = {}
        for row in fresh:
            by_boot.setdefault((row["device_id"], row["boot_id"]), []).append(row["seq"])
        for (device, boot), seqs in by_boot.items():
            self._track_seqs(conn, device, boot, seqs)
        self._row_alerts(conn, fresh)
        last: dict[str, datetime] = {row["device_id"]: row["received_at"] for row in fresh}
        for device, at in last.items():
            self._touch_device(conn, device, last_result_at=at)
        return outcomes

    def _row_alerts(self, conn: Connection, rows: list[dict[str, Any]]) -> None:
        """Per new row: a reused seq number, and one open high-risk alert per slide."""
        for row in rows:
            check_reused_seq(conn, row, self._alert)
            if self.high_risk_alerts and row["risk"] == "high" and not row["review"]:
                raise_high_risk(conn, row, self._alert)

    def _same_again(self, conn: Connection, row: dict[str, Any], topic: str) -> str:
        """A second copy of a stored ``message_id``: a duplicate, or a conflict kept aside."""
        mine = results.c.message_id == row["message_id"]
        first = conn.execute(select(results.c.payload).where(mine)).scalar_one()
        if json.loads(first) == json.loads(row["payload"]):
            return DUPLICATE
        copy = Rejection(
            topic,
            row["payload"].encode("utf-8"),
            "conflict: a different result with this message_id is already stored",
            CONFLICT,
            row["device_id"],
            row["message_id"],
        )
        self._reject(conn, copy, row["received_at"])
        return CONFLICT

    def reject(self, items: Sequence[Rejection]) -> None:
        """Set messages aside in ``rejected`` (one transaction), an alert for each."""
        now = utcnow()
        try:
            with self.engine.begin() as conn:
                for item in items:
                    self._reject(conn, item, now)
        except SQLAlchemyError as exc:
            raise ArchiveError(f"cannot set aside {len(items)} message(s): {exc}") from exc

    def _reject(self, conn: Connection, item: Rejection, now: datetime) -> None:
        topic, reason = safe_text(item.topic), safe_text(item.reason)
        values = {
            "received_at": now,
            "topic": topic,
            "device_id": item.device_id,
            "message_id": item.message_id,
            "kind": item.kind,
            "reason": reason,
            "payload": item.payload,
        }
        new_id = conn.execute(insert(rejected).values(**values).returning(rejected.c.id)).scalar()
        what = f"message {item.message_id}" if item.message_id else "a message"
        self._alert(
            conn,
            f"rejected:{new_id}",
            "conflict" if item.kind == CONFLICT else "rejected",
            item.device_id or "(unknown)",
            f"{what} on {topic[:200]} set aside ({item.kind}): {reason[:300]}",
            message_id=item.message_id,
        )

    def _track_seqs(self, conn: Connection, device: str, boot: str, seqs: list[int]) -> None:
        """Seq bookkeeping for new results of one boot: max seq, gap alerts opened and split.

        The boot's row is locked first (``FOR UPDATE`` on PostgreSQL; SQLite writers hold the
        database), so instances sharing the load see each other's bookkeeping in turn.
        """
        conn.execute(
            self._insert_ignore(
                boots,
                ["device_id", "boot_id"],
                {"device_id": device, "boot_id": boot, "max_seq": 0, "first_seen": utcnow()},
            )
        )
        mine = and_(boots.c.device_id == device, boots.c.boot_id == boot)
        highest = conn.execute(select(boots.c.max_seq).where(mine).with_for_update()).scalar_one()
        conn.execute(update(boots).where(mine).values(max_seq=max(highest, *seqs)))
        same_boot = and_(alerts.c.device_id == device, alerts.c.boot_id == boot)
        gaps = [
            (g.id, g.seq_from, g.seq_to)
            for g in conn.execute(
                select(alerts.c.id, alerts.c.seq_from, alerts.c.seq_to).where(
                    same_boot, alerts.c.kind == "seq_gap", alerts.c.resolved_at.is_(None)
                )
            )
        ]
        for seq in sorted(seqs):
            gap = next((g for g in gaps if g[1] <= seq <= g[2]), None)
            if gap is not None:  # a late arrival fills (part of) a gap: split what is missing
                gaps.remove(gap)
                conn.execute(
                    update(alerts).where(alerts.c.id == gap[0]).values(resolved_at=utcnow())
                )
                gaps += self._gap(conn, device, boot, gap[1], seq - 1)
                gaps += self._gap(conn, device, boot, seq + 1, gap[2])
            elif seq > highest:
                gaps += self._gap(conn, device, boot, highest + 1, seq - 1)
            else:  # below the highest seq and in no open gap: measure from the stored ones
                previous = conn.execute(
                    select(func.max(results.c.seq)).where(
                        results.c.device_id == device,
                        results.c.boot_id == boot,
                        results.c.seq < seq,
                    )
                ).scalar()
                gaps += self._gap(conn, device, boot, (previous or 0) + 1, seq - 1)
            highest = max(highest, seq)

    def _gap(
        self, conn: Connection, device: str, boot: str, first: int, last: int
    ) -> list[tuple[int, int, int]]:
        if first > last:
            return []
        key = f"seq_gap:{device}:{boot}:{first}-{last}:{utcnow().isoformat()}"
        self._alert(
            conn,
            key,
            "seq_gap",
            device,
            gap_text(conn, device, boot, first, last),
            boot_id=boot,
            seq_from=first,
            seq_to=last,
        )
        found = conn.execute(select(alerts.c.id).where(alerts.c.key == key)).scalar()
        return [] if found is None else [(int(found), first, last)]

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
        """The retained status (None: cleared); an older ``at`` never overwrites a newer one.

        ``at`` is compared as a parsed instant bounded by the archive's clock (a status from
        a clock once in the future must not stick)."""
        at = str(status.get("at", "")) if status else None
        when = status_time(status, utcnow()) if status else None
        body = json.dumps(status, allow_nan=False) if status else None
        try:
            with self.engine.begin() as conn:
                if status:  # a cleared status (decommissioning) must not re-create the device
                    self._touch_device(conn, device)
                where = [devices.c.device_id == device]
                if when is not None:
                    where.append(devices.c.status_time.is_(None) | (devices.c.status_time <= when))
                values = {"status": body, "status_at": at, "status_time": when}
                conn.execute(update(devices).where(*where).values(**values))
        except SQLAlchemyError as exc:
            raise ArchiveError(f"cannot store status of {device}: {exc}") from exc

    def set_ota_state(self, device: str, state: dict[str, Any] | None) -> None:
        """The retained model-store state (None: cleared)."""
        body = json.dumps(state, allow_nan=False) if state else None
        try:
            with self.engine.begin() as conn:
                if state:
                    self._touch_device(conn, device, ota_state=body)
                    record_ota_event(conn, device, state, self._alert)
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
