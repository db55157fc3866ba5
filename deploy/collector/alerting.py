"""What raises an alert and how it reads: one open high-risk alert per slide, seq gaps and
reused seq numbers in words a lab can act on (rounded numbers, slide and device names, the
boot by its start time rather than its id).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, func, select, text, update

from deploy.collector.tables import alerts, results

# (conn, key, kind, device, detail, **columns) -> None: the store's insert-if-new
InsertAlert = Callable[..., None]


def _boot_started(conn: Connection, device: str, boot: str) -> str:
    first: datetime | None = conn.execute(
        select(func.min(results.c.started_at)).where(
            results.c.device_id == device, results.c.boot_id == boot
        )
    ).scalar()
    return "?" if first is None else first.strftime("%Y-%m-%d %H:%M UTC")


def _span(first: int, last: int) -> str:
    return f"result {first}" if first == last else f"results {first}\u2013{last}"


def gap_text(conn: Connection, device: str, boot: str, first: int, last: int) -> str:
    """E.g. "scope-07: results 1–2 of the boot started 2026-01-01 11:59 UTC not received"."""
    started = _boot_started(conn, device, boot)
    return f"{device}: {_span(first, last)} of the boot started {started} not received"


def high_risk_text(row: dict[str, Any]) -> str:
    """E.g. "Slide S-0001 on scope-07: high risk, p(high) 0.92 (model omis-test v4)"."""
    text = f"Slide {row['slide_id']} on {row['device_id']}: high risk"
    if row.get("p_high") is not None:
        text += f", p(high) {row['p_high']:.2f}"
    if row.get("model_name"):
        text += f" (model {row['model_name']} v{row.get('model_version')})"
    return text


def raise_high_risk(conn: Connection, row: dict[str, Any], insert_alert: InsertAlert) -> None:
    """One open high-risk alert per slide: a repeat updates the open one instead of adding."""
    c = alerts.c
    if conn.dialect.name == "postgresql":  # two collectors, one slide: still one alert
        key = int.from_bytes(hashlib.sha256(row["slide_id"].encode()).digest()[:8], "big") >> 1
        conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": key})
    query = select(c.id).where(
        c.kind == "high_risk",
        c.slide_id == row["slide_id"],
        c.resolved_at.is_(None),
        c.acked_at.is_(None),
    )
    found = conn.execute(query.order_by(c.id).limit(1)).scalar()
    detail = high_risk_text(row)
    if found is not None:
        conn.execute(
            update(alerts)
            .where(c.id == found)
            .values(message_id=row["message_id"], detail=detail, count=c.count + 1)
        )
        return
    insert_alert(
        conn,
        f"high_risk:{row['message_id']}",
        "high_risk",
        row["device_id"],
        detail,
        message_id=row["message_id"],
        slide_id=row["slide_id"],
    )


def check_reused_seq(conn: Connection, row: dict[str, Any], insert_alert: InsertAlert) -> None:
    """A seq number a boot already used for another message raises ``seq_reused`` (once)."""
    device, boot, seq = row["device_id"], row["boot_id"], row["seq"]
    slides = (
        conn.execute(
            select(results.c.slide_id)
            .where(results.c.device_id == device, results.c.boot_id == boot, results.c.seq == seq)
            .order_by(results.c.id)
        )
        .scalars()
        .all()
    )
    if len(slides) < 2:
        return
    started = _boot_started(conn, device, boot)
    text = (
        f"{device}: result {seq} of the boot started {started} was sent again as another "
        f"message (slides {', '.join(dict.fromkeys(slides))})"
    )
    insert_alert(
        conn,
        f"seq_reused:{device}:{boot}:{seq}",
        "seq_reused",
        device,
        text,
        boot_id=boot,
        seq_from=seq,
        seq_to=seq,
        message_id=row["message_id"],
        slide_id=row["slide_id"],
    )
