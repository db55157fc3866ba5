"""What the lab sees of the fleet: each device's model, OTA step, outcomes and rollouts.

:func:`record_ota_event` runs inside the archive's write of a device's retained ``ota/state``:
when the state's ``progress`` names a final step (``committed``, ``rolled_back``,
``rejected``) of an offer, one row per (device, offer, step) goes into ``ota_events`` (a copy
of the same retained message, or another instance's, adds nothing), and a rollback raises an
alert.  :func:`fleet_summary` adds the fleet block that ``GET /api/devices`` carries.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from sqlalchemy import Connection, Engine, and_, func, select
from sqlalchemy.exc import IntegrityError

from deploy.collector.tables import device_groups, ota_events, rollout_devices, rollouts
from deploy.fleet.store import utcnow

log = logging.getLogger(__name__)

FINAL_STEPS = frozenset({"committed", "rolled_back", "rejected"})
Alert = Callable[[Connection, str, str, str, str], None]


def _text(value: Any, limit: int) -> str | None:
    return value[:limit] if isinstance(value, str) and value else None


def _int(value: Any) -> int | None:
    ok = isinstance(value, int) and not isinstance(value, bool) and abs(value) < 2**63
    return value if ok else None


def record_ota_event(
    conn: Connection, device: str, state: dict[str, Any], alert: Alert | None = None
) -> bool:
    """Append the final step this ``ota/state`` reports, once; True when it was new."""
    progress = state.get("progress")
    if not isinstance(progress, dict):
        return False
    step = progress.get("step")
    # any JSON type may arrive: a list or object is no step (and is unhashable)
    if not isinstance(step, str) or step not in FINAL_STEPS:
        return False
    cid = _text(progress.get("correlation_id"), 128)
    if cid is None:
        return False
    version = _int(progress.get("version"))
    reason = _text(progress.get("reason"), 2000)
    exists = conn.execute(
        select(ota_events.c.id).where(
            and_(
                ota_events.c.device_id == device,
                ota_events.c.correlation_id == cid,
                ota_events.c.step == step,
            )
        )
    ).first()
    if exists is not None:
        return False
    try:
        with conn.begin_nested():
            conn.execute(
                ota_events.insert().values(
                    device_id=device,
                    correlation_id=cid,
                    step=step,
                    version=version,
                    reason=reason,
                    at=utcnow(),
                )
            )
    except IntegrityError:  # another archive instance stored the same event first
        return False
    if step == "rolled_back" and alert is not None:
        text = f"{device} rolled back model version {version}" + (f": {reason}" if reason else "")
        alert(conn, f"rollback:{device}:{cid}", "rollback", device, text)
    return True


def fleet_summary(engine: Engine, device_rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``device_rows`` (from ``/api/devices``) each with a ``fleet`` block added."""
    with engine.connect() as conn:
        groups: dict[str, list[str]] = {}
        for name, device in conn.execute(
            select(device_groups.c.group_name, device_groups.c.device_id)
        ):
            groups.setdefault(device, []).append(name)
        counts: dict[tuple[str, str], int] = {
            (d, s): int(n)
            for d, s, n in conn.execute(
                select(ota_events.c.device_id, ota_events.c.step, func.count()).group_by(
                    ota_events.c.device_id, ota_events.c.step
                )
            )
        }
        latest = _latest_rollout_steps(conn)
    for row in device_rows:
        device = row.get("device_id", "")
        state = _dict(row.get("ota_state"))
        progress = _dict(state.get("progress"))
        row["fleet"] = {
            "serving_version": state.get("current"),
            "previous_version": state.get("previous"),
            "pending_version": state.get("pending"),
            "shadow_version": _dict(state.get("shadow")).get("version"),
            "ota_step": progress.get("step"),
            "last_outcome": state.get("last_outcome"),
            "commits": counts.get((device, "committed"), 0),
            "rollbacks": counts.get((device, "rolled_back"), 0),
            "rejections": counts.get((device, "rejected"), 0),
            "groups": sorted(groups.get(device, [])),
            "rollout": latest.get(device),
        }
    return device_rows


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _latest_rollout_steps(conn: Connection) -> dict[str, dict[str, Any]]:
    """Each device's step in the newest rollout that includes it."""
    query = (
        select(
            rollout_devices.c.device_id,
            rollout_devices.c.step,
            rollout_devices.c.wave,
            rollouts.c.id,
            rollouts.c.state,
            rollouts.c.bundle_version,
        )
        .join(rollouts, rollouts.c.id == rollout_devices.c.rollout_id)
        .order_by(rollouts.c.id)
    )
    out: dict[str, dict[str, Any]] = {}
    for device, step, wave, rid, state, version in conn.execute(query):
        out[device] = {
            "id": int(rid),
            "state": state,
            "version": int(version),
            "wave": int(wave),
            "step": step,
        }
    return out


def rollout_json(engine: Engine, limit: int) -> list[dict[str, Any]]:
    """The newest rollouts as ``omis fleet status --json`` prints them."""
    from deploy.fleet.store import FleetStore

    return [r.as_json() for r in FleetStore(engine).rollouts(limit)]


def groups_json(engine: Engine) -> dict[str, list[str]]:
    """Every device group."""
    from deploy.fleet.store import FleetStore

    return FleetStore(engine).groups()
