"""The lab's work on the archive: the worklist (with the QC sample), claims, reviews, alert acks.

Every write is one transaction together with its audit entry (:mod:`deploy.collector.audit`).
Reviews are append-only: the newest row per ``message_id`` is the verdict, an amendment is a
new row that names the one it supersedes.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import (
    Connection,
    Engine,
    and_,
    case,
    delete,
    func,
    insert,
    literal,
    select,
    update,
)

from deploy.collector.audit import Actor, record
from deploy.collector.bethesda import pap_class
from deploy.collector.queries import rfc3339
from deploy.collector.store import utcnow
from deploy.collector.tables import alerts, claims, results, reviews, users

REASONS = ("high_risk", "abstained", "insufficient_fields", "failed_scan", "qc_sample")
# abstain reasons that mean "too few usable fields" (docs/mqtt.md; the contract's new name)
INSUFFICIENT = ("no_usable_field", "insufficient_fields", "too_few_fields")


class NotFoundError(Exception):
    """No such result, alert or user."""


class ConflictError(Exception):
    """The request contradicts the stored state (already acknowledged, claimed by another)."""


class ForbiddenError(Exception):
    """The caller's role may not do this."""


def reason_column(share: float) -> Any:
    """SQL for an item's worklist reason (NULL: the result needs no person)."""
    c = results.c
    return case(
        (c.outcome == "failed", literal("failed_scan")),
        (and_(c.outcome == "abstained", c.outcome_reason.in_(INSUFFICIENT)), "insufficient_fields"),
        (c.outcome == "abstained", literal("abstained")),
        (and_(c.outcome == "classified", c.risk == "high"), literal("high_risk")),
        (and_(c.outcome == "classified", c.qc_rank < share), literal("qc_sample")),
        else_=None,
    )


def _latest_review_ids() -> Any:
    return (
        select(reviews.c.message_id, func.max(reviews.c.id).label("review_id"))
        .group_by(reviews.c.message_id)
        .subquery()
    )


def report_status(reviews: list[dict[str, Any]]) -> str:
    """``preliminary`` before sign-out, ``final`` after it, ``amended`` after an amendment."""
    if not reviews:
        return "preliminary"
    return "final" if len(reviews) == 1 else "amended"


def review_json(row: Any) -> dict[str, Any]:
    """One review row as JSON, with its Pap group and risk."""
    data = dict(row._mapping)
    data["created_at"] = rfc3339(data["created_at"])
    mapped = pap_class(data["bethesda"])
    data["pap_group"] = None if mapped is None else mapped.pap_group
    data["risk"] = None if mapped is None else mapped.risk
    return data


@dataclass(frozen=True)
class WorklistFilter:
    """The filters of ``GET /api/worklist``."""

    device: str | None = None
    reason: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    claimed_by: str | None = None  # "none" = unclaimed
    signed: str = "false"  # "false" | "true" | "any"


class Worklist:
    """The worklist and everything people write into the archive."""

    def __init__(self, engine: Engine, *, qc_sample_share: float = 0.10) -> None:
        self.engine = engine
        self.share = qc_sample_share

    # -- reading ---------------------------------------------------------------------------

    def items(
        self, where: WorklistFilter, limit: int, offset: int
    ) -> tuple[int, list[dict[str, Any]]]:
        """(total, one page oldest first) of results that need a person."""
        c = results.c
        reason = reason_column(self.share).label("reason")
        latest = _latest_review_ids()
        base = (
            select(
                c.message_id,
                c.device_id,
                c.slide_id,
                c.finished_at,
                c.outcome,
                c.outcome_reason,
                c.outcome_stage,
                c.risk,
                c.p_high,
                reason,
                claims.c.user_name.label("claimed_by"),
                claims.c.claimed_at,
                latest.c.review_id,
            )
            .outerjoin(claims, claims.c.message_id == c.message_id)
            .outerjoin(latest, latest.c.message_id == c.message_id)
        )
        conditions = [reason_column(self.share).is_not(None)]
        conditions += self._conditions(where, latest)
        query = base.where(*conditions)
        total_query = select(func.count()).select_from(query.subquery())
        page = query.order_by(c.finished_at, c.id).limit(limit).offset(offset)
        with self.engine.connect() as conn:
            total = int(conn.execute(total_query).scalar_one())
            rows = conn.execute(page).all()
            verdicts = self._reviews_by_id(conn, [r.review_id for r in rows if r.review_id])
        items = []
        for row in rows:
            data = dict(row._mapping)
            review_id = data.pop("review_id")
            data["finished_at"] = rfc3339(data["finished_at"])
            data["claimed_at"] = rfc3339(data["claimed_at"])
            data["verdict"] = verdicts.get(review_id)
            items.append(data)
        return total, items

    def _conditions(self, where: WorklistFilter, latest: Any) -> list[Any]:
        c = results.c
        out: list[Any] = []
        if where.device is not None:
            out.append(c.device_id == where.device)
        if where.reason is not None:
            out.append(reason_column(self.share) == where.reason)
        if where.since is not None:
            out.append(c.finished_at >= where.since)
        if where.until is not None:
            out.append(c.finished_at < where.until)
        if where.claimed_by == "none":
            out.append(claims.c.user_name.is_(None))
        elif where.claimed_by is not None:
            out.append(claims.c.user_name == where.claimed_by)
        if where.signed == "false":
            out.append(latest.c.review_id.is_(None))
        elif where.signed == "true":
            out.append(latest.c.review_id.is_not(None))
        return out

    @staticmethod
    def _reviews_by_id(conn: Connection, ids: list[int]) -> dict[int, dict[str, Any]]:
        if not ids:
            return {}
        rows = conn.execute(select(reviews).where(reviews.c.id.in_(ids))).all()
        return {r.id: review_json(r) for r in rows}

    def reviews_of(self, message_id: str) -> list[dict[str, Any]]:
        """Every review of one result, oldest first."""
        query = select(reviews).where(reviews.c.message_id == message_id).order_by(reviews.c.id)
        with self.engine.connect() as conn:
            return [review_json(r) for r in conn.execute(query).all()]

    # -- writing ---------------------------------------------------------------------------

    def _result(self, conn: Connection, message_id: str) -> Any:
        query = select(results.c.id, results.c.slide_id).where(results.c.message_id == message_id)
        if self.engine.dialect.name == "postgresql":
            query = query.with_for_update()  # amendments of one result take turns
        row = conn.execute(query).first()
        if row is None:
            raise NotFoundError(f"no result {message_id!r}")
        return row

    def add_review(
        self, message_id: str, verdict: dict[str, Any], actor: Actor
    ) -> tuple[dict[str, Any], str]:
        """Append a review (sign-out or amendment); (the review, the report status)."""
        with self.engine.begin() as conn:
            slide = self._result(conn, message_id).slide_id
            previous = conn.execute(
                select(reviews)
                .where(reviews.c.message_id == message_id)
                .order_by(reviews.c.id.desc())
            ).first()
            new_id = conn.execute(
                insert(reviews)
                .values(
                    message_id=message_id,
                    slide_id=slide,
                    bethesda=verdict["bethesda"],
                    adequacy=verdict["adequacy"],
                    comment=verdict.get("comment"),
                    user_name=actor.name,
                    role=actor.role or "",
                    created_at=utcnow(),
                    supersedes=None if previous is None else previous.id,
                )
                .returning(reviews.c.id)
            ).scalar_one()
            action = "review.sign_out" if previous is None else "review.amend"
            before = None if previous is None else review_json(previous)
            detail = {"slide_id": slide, "review_id": new_id, "new": verdict, "previous": before}
            record(conn, actor, action, message_id, detail)
            row = conn.execute(select(reviews).where(reviews.c.id == new_id)).one()
        return review_json(row), "final" if previous is None else "amended"

    def claim(self, message_id: str, actor: Actor, user: str | None) -> dict[str, Any]:
        """Claim for ``actor`` or assign to ``user`` (the API checks who may assign)."""
        target = user or actor.name
        manager = actor.role in ("pathologist", "admin")
        with self.engine.begin() as conn:
            self._result(conn, message_id)
            if user is not None:
                self._check_assignee(conn, user)
            held = conn.execute(select(claims).where(claims.c.message_id == message_id)).first()
            if held is not None and held.user_name != target and not manager:
                raise ConflictError(f"claimed by {held.user_name} already")
            conn.execute(delete(claims).where(claims.c.message_id == message_id))
            now = utcnow()
            conn.execute(
                insert(claims).values(
                    message_id=message_id,
                    user_name=target,
                    assigned_by=actor.name,
                    claimed_at=now,
                )
            )
            action = "worklist.claim" if target == actor.name else "worklist.assign"
            previous = None if held is None else held.user_name
            record(conn, actor, action, message_id, {"user": target, "previous": previous})
        return {
            "message_id": message_id, "claimed_by": target, "claimed_at": rfc3339(now),
            "assigned_by": actor.name,
        }  # fmt: skip

    @staticmethod
    def _check_assignee(conn: Connection, name: str) -> None:
        row = conn.execute(select(users).where(users.c.name == name)).first()
        if row is None or row.disabled:
            raise NotFoundError(f"no enabled user {name!r}")
        if row.role not in ("cytotech", "pathologist", "admin"):
            raise ConflictError(f"user {name!r} ({row.role}) may not review")

    def release(self, message_id: str, actor: Actor) -> None:
        """Drop the claim (its holder, or a pathologist/admin)."""
        with self.engine.begin() as conn:
            self._result(conn, message_id)
            held = conn.execute(select(claims).where(claims.c.message_id == message_id)).first()
            if held is None:
                raise ConflictError("not claimed")
            if held.user_name != actor.name and actor.role not in ("pathologist", "admin"):
                raise ForbiddenError(f"claimed by {held.user_name}, not by you")
            conn.execute(delete(claims).where(claims.c.message_id == message_id))
            record(conn, actor, "worklist.release", message_id, {"previous": held.user_name})

    def ack_alert(self, alert_id: int, actor: Actor, note: str | None) -> dict[str, Any]:
        """Acknowledge an alert (who, when); high-risk alerts need a cytotech or above."""
        with self.engine.begin() as conn:
            query = select(alerts).where(alerts.c.id == alert_id)
            if self.engine.dialect.name == "postgresql":
                query = query.with_for_update()
            row = conn.execute(query).first()
            if row is None:
                raise NotFoundError(f"no alert {alert_id}")
            if row.kind == "high_risk" and actor.role not in ("cytotech", "pathologist", "admin"):
                raise ForbiddenError("high-risk alerts are acknowledged by a cytotech or above")
            if row.acked_at is not None:
                raise ConflictError(f"acknowledged by {row.acked_by} at {rfc3339(row.acked_at)}")
            now = utcnow()
            conn.execute(
                update(alerts)
                .where(alerts.c.id == alert_id)
                .values(acked_at=now, acked_by=actor.name)
            )
            detail = {"kind": row.kind, "slide_id": row.slide_id, "note": note}
            record(conn, actor, "alert.ack", str(alert_id), detail)
            acked = conn.execute(select(alerts).where(alerts.c.id == alert_id)).one()
        return alert_json(acked)


def alert_json(row: Any) -> dict[str, Any]:
    """One alert row as JSON (without its internal key)."""
    data = dict(row._mapping)
    for key in ("created_at", "resolved_at", "acked_at"):
        data[key] = rfc3339(data[key])
    data.pop("key", None)
    return data


@dataclass(frozen=True)
class AlertFilter:
    """The filters of ``GET /api/alerts``."""

    open_only: bool = False
    kind: str | None = None
    device: str | None = None
    acked: bool | None = None


def list_alerts(
    engine: Engine, where: AlertFilter, limit: int, offset: int
) -> tuple[int, list[dict[str, Any]]]:
    """(total, one page): open high-risk alerts first, then newest first."""
    c = alerts.c
    conditions: list[Any] = []
    if where.open_only:
        conditions += [c.resolved_at.is_(None), c.acked_at.is_(None)]
    if where.kind is not None:
        conditions.append(c.kind == where.kind)
    if where.device is not None:
        conditions.append(c.device_id == where.device)
    if where.acked is not None:
        conditions.append(c.acked_at.is_not(None) if where.acked else c.acked_at.is_(None))
    urgent = case(
        (and_(c.kind == "high_risk", c.resolved_at.is_(None), c.acked_at.is_(None)), 0), else_=1
    )
    query = select(alerts).where(*conditions)
    page = query.order_by(urgent, c.created_at.desc(), c.id.desc()).limit(limit).offset(offset)
    with engine.connect() as conn:
        total = int(
            conn.execute(select(func.count()).select_from(alerts).where(*conditions)).scalar_one()
        )
        rows = conn.execute(page).all()
    return total, [alert_json(r) for r in rows]
