"""Groups and rollouts in the archive database (tables in :mod:`deploy.collector.tables`).

A rollout row is the durable record a restarted ``omis fleet rollout`` resumes from: its
target devices in order, the wave each belongs to, and each device's step.  While a rollout
runs, ``active_key`` holds its bundle's sha256 (a unique column), so a second rollout of the
same bundle cannot start beside it; a command that drives a rollout leases it (``owner`` and a
``heartbeat_at`` it renews), so a killed command's rollout can be taken over and resumed while
a live one's cannot.
"""

from __future__ import annotations

import json
import logging
import os
import socket
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

from sqlalchemy import Engine, and_, delete, func, insert, select, update
from sqlalchemy.exc import IntegrityError, SQLAlchemyError

from deploy.collector.tables import device_groups, rollout_devices, rollouts
from deploy.exceptions import FleetError
from firmware_bridge.exceptions import InputError
from firmware_bridge.fsutil import pid_alive
from firmware_bridge.limits import check_identifier

log = logging.getLogger(__name__)

#: Steps of one device in a rollout.  ``pending`` and ``offered`` are not final.
STEPS = (
    "pending",
    "offered",
    "shadow",  # --shadow-first: held in shadow, compared on the device's slides
    "promoted",  # --shadow-first: the comparison passed, the promote offer was sent
    "committed",
    "rejected",
    "rolled_back",
    "timeout",
    "compare_failed",  # --shadow-first: the comparison failed its criterion
)
SUCCESS = "committed"
FAILURES = frozenset({"rejected", "rolled_back", "timeout", "compare_failed"})
STATES = ("running", "halted", "completed")


def utcnow() -> datetime:
    """Now as naive UTC (the archive's storage convention)."""
    return datetime.now(timezone.utc).replace(tzinfo=None)


def this_owner() -> str:
    """``host:pid`` of this process: who drives a rollout."""
    return f"{socket.gethostname()}:{os.getpid()}"


def owner_alive(owner: str | None) -> bool | None:
    """True/False for an owner on this host (its pid alive or not); None for another host."""
    if not owner:
        return False
    host, _, pid = owner.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return None
    return pid_alive(int(pid))


def check_device(device: str) -> str:
    """``device`` if it is a valid device id; else a :class:`FleetError` naming it."""
    try:
        return check_identifier(device, "device id")
    except InputError as exc:
        raise FleetError(str(exc)) from None


def check_group(name: str) -> str:
    """``name`` if it is a valid group name (the identifier rule)."""
    try:
        return check_identifier(name, "group name")
    except InputError as exc:
        raise FleetError(str(exc)) from None


@dataclass(frozen=True)
class BundleRef:
    """The bundle a rollout offers."""

    sha256: str
    name: str
    version: int


@dataclass(frozen=True)
class _Plan:
    bundle: BundleRef
    target: dict[str, Any]
    waves: list[list[str]]
    canary: int
    wave_size: int


@dataclass
class DeviceStep:
    """One device's place and step in a rollout."""

    device_id: str
    position: int
    wave: int
    step: str
    version: int | None = None
    detail: str | None = None
    updated_at: datetime | None = None

    def as_json(self) -> dict[str, Any]:
        """For ``--json`` and the API."""
        return {
            "device_id": self.device_id,
            "wave": self.wave,
            "step": self.step,
            "version": self.version,
            "detail": self.detail,
            "updated_at": _rfc3339(self.updated_at),
        }


@dataclass
class RolloutRecord:
    """A rollout and its devices, as stored."""

    id: int
    bundle: BundleRef
    target: dict[str, Any]
    canary: int
    wave_size: int
    state: str
    reason: str | None
    owner: str | None
    heartbeat_at: datetime | None
    created_at: datetime
    updated_at: datetime
    devices: list[DeviceStep] = field(default_factory=list)

    def waves(self) -> list[list[DeviceStep]]:
        """The devices grouped by wave, in order."""
        out: dict[int, list[DeviceStep]] = {}
        for step in sorted(self.devices, key=lambda d: d.position):
            out.setdefault(step.wave, []).append(step)
        return [out[k] for k in sorted(out)]

    def as_json(self) -> dict[str, Any]:
        """For ``--json``, ``omis fleet status`` and ``GET /api/fleet/rollouts``."""
        counts = {s: 0 for s in STEPS}
        for d in self.devices:
            counts[d.step] = counts.get(d.step, 0) + 1
        return {
            "id": self.id,
            "bundle": {
                "sha256": self.bundle.sha256,
                "name": self.bundle.name,
                "version": self.bundle.version,
            },
            "target": self.target,
            "canary": self.canary,
            "wave_size": self.wave_size,
            "state": self.state,
            "reason": self.reason,
            "created_at": _rfc3339(self.created_at),
            "updated_at": _rfc3339(self.updated_at),
            "counts": counts,
            "waves": [[d.as_json() for d in wave] for wave in self.waves()],
        }


def _rfc3339(value: datetime | None) -> str | None:
    return None if value is None else value.replace(microsecond=0).isoformat() + "Z"


def plan_waves(devices: Sequence[str], canary: int, wave_size: int) -> list[list[str]]:
    """Canary devices first, then the rest in waves of ``wave_size`` (0: all the rest at once)."""
    if canary < 1:
        raise FleetError("--canary must be at least 1 (the first wave)")
    if wave_size < 0:
        raise FleetError("--wave-size must be 0 (the rest in one wave) or more")
    if not devices:
        raise FleetError("a rollout needs at least one device")
    if len(set(devices)) != len(devices):
        dupes = sorted({d for d in devices if devices.count(d) > 1})
        raise FleetError(f"device listed twice: {', '.join(dupes)}")
    first, rest = list(devices[:canary]), list(devices[canary:])
    size = wave_size or len(rest) or 1
    return [first] + [rest[i : i + size] for i in range(0, len(rest), size)]


class FleetStore:
    """Device groups and rollouts on an archive engine (SQLite or PostgreSQL)."""

    def __init__(self, engine: Engine, *, lease_s: float = 30.0) -> None:
        self.engine = engine
        self.lease = timedelta(seconds=lease_s)

    # -- groups ------------------------------------------------------------------------------

    def add_to_group(self, group: str, devices: Sequence[str]) -> int:
        """Add devices to ``group`` (creating it); returns how many were new."""
        check_group(group)
        wanted = [check_device(d) for d in devices]
        if not wanted:
            raise FleetError("give at least one device id to add")
        added = 0
        with self._begin() as conn:
            have = set(
                conn.scalars(
                    select(device_groups.c.device_id).where(device_groups.c.group_name == group)
                )
            )
            for device in dict.fromkeys(wanted):
                if device in have:
                    continue
                conn.execute(
                    insert(device_groups).values(
                        group_name=group, device_id=device, added_at=utcnow()
                    )
                )
                added += 1
        return added

    def remove_from_group(self, group: str, devices: Sequence[str] = ()) -> int:
        """Remove devices (all when none named) from ``group``; returns how many went."""
        check_group(group)
        if group not in self.groups():
            raise FleetError(f"unknown group {group!r}")
        cond = device_groups.c.group_name == group
        if devices:
            cond = and_(cond, device_groups.c.device_id.in_([check_device(d) for d in devices]))
        with self._begin() as conn:
            return int(conn.execute(delete(device_groups).where(cond)).rowcount or 0)

    def groups(self) -> dict[str, list[str]]:
        """Every group with its devices (sorted)."""
        out: dict[str, list[str]] = {}
        with self._connect() as conn:
            rows = conn.execute(
                select(device_groups.c.group_name, device_groups.c.device_id).order_by(
                    device_groups.c.group_name, device_groups.c.device_id
                )
            )
            for name, device in rows:
                out.setdefault(name, []).append(device)
        return out

    def group_devices(self, group: str) -> list[str]:
        """The devices of ``group``; an unknown or empty group is an error."""
        check_group(group)
        members = self.groups().get(group)
        if not members:
            raise FleetError(f"unknown group {group!r} (omis fleet group add {group} DEVICE...)")
        return members

    # -- rollouts ----------------------------------------------------------------------------

    def begin_rollout(
        self,
        bundle: BundleRef,
        target: dict[str, Any],
        waves: list[list[str]],
        canary: int,
        wave_size: int,
    ) -> tuple[RolloutRecord, bool]:
        """Resume this bundle's interrupted rollout, or start a new one.

        Returns ``(record, resumed)``.  Refuses while another live command drives a rollout of
        the same bundle, and when that rollout's devices differ from ``waves``.
        """
        owner = this_owner()
        with self._begin() as conn:
            row = conn.execute(
                select(rollouts).where(rollouts.c.active_key == bundle.sha256)
            ).first()
            if row is not None:
                self._take_over(conn, row._mapping, owner, waves)
                rollout_id = int(row.id)
                resumed = True
            else:
                plan = _Plan(bundle, target, waves, canary, wave_size)
                rollout_id = self._insert(conn, plan, owner)
                resumed = False
        return self.rollout(rollout_id), resumed

    def _take_over(self, conn: Any, row: Any, owner: str, waves: list[list[str]]) -> None:
        alive = owner_alive(row["owner"])
        fresh = row["heartbeat_at"] is not None and utcnow() - row["heartbeat_at"] < self.lease
        if row["owner"] != owner and (alive is True or (alive is None and fresh)):
            raise FleetError(
                f"rollout {row['id']} of this bundle is already running "
                f"(driven by {row['owner']}); wait for it or stop that command"
            )
        stored = [
            d
            for (d,) in conn.execute(
                select(rollout_devices.c.device_id)
                .where(rollout_devices.c.rollout_id == row["id"])
                .order_by(rollout_devices.c.position)
            )
        ]
        if stored != [d for wave in waves for d in wave]:
            raise FleetError(
                f"rollout {row['id']} of this bundle is interrupted with other devices "
                f"({', '.join(stored)}); resume it with the same target"
            )
        conn.execute(
            update(rollouts)
            .where(rollouts.c.id == row["id"])
            .values(owner=owner, heartbeat_at=utcnow(), updated_at=utcnow())
        )
        log.info("resuming rollout %s (was driven by %s)", row["id"], row["owner"])

    def _insert(self, conn: Any, plan: _Plan, owner: str) -> int:
        bundle, waves = plan.bundle, plan.waves
        now = utcnow()
        try:
            rollout_id = conn.execute(
                insert(rollouts)
                .values(
                    bundle_sha256=bundle.sha256,
                    bundle_name=bundle.name,
                    bundle_version=bundle.version,
                    target=json.dumps(plan.target, sort_keys=True, allow_nan=False),
                    canary=plan.canary,
                    wave_size=plan.wave_size,
                    state="running",
                    active_key=bundle.sha256,
                    owner=owner,
                    heartbeat_at=now,
                    created_at=now,
                    updated_at=now,
                )
                .returning(rollouts.c.id)
            ).scalar_one()
        except IntegrityError as exc:  # another command started it between our read and insert
            raise FleetError("a rollout of this bundle started at the same moment; retry") from exc
        position = 0
        for wave_no, wave in enumerate(waves):
            for device in wave:
                conn.execute(
                    insert(rollout_devices).values(
                        rollout_id=rollout_id,
                        device_id=device,
                        position=position,
                        wave=wave_no,
                        step="pending",
                        updated_at=now,
                    )
                )
                position += 1
        return int(rollout_id)

    def heartbeat(self, rollout_id: int) -> None:
        """Renew this command's lease on a running rollout."""
        with self._begin() as conn:
            conn.execute(
                update(rollouts)
                .where(and_(rollouts.c.id == rollout_id, rollouts.c.state == "running"))
                .values(heartbeat_at=utcnow())
            )

    def set_step(
        self,
        rollout_id: int,
        device: str,
        step: str,
        *,
        version: int | None = None,
        detail: str | None = None,
    ) -> None:
        """Record one device's step."""
        if step not in STEPS:
            raise FleetError(f"unknown rollout step {step!r}")
        now = utcnow()
        with self._begin() as conn:
            conn.execute(
                update(rollout_devices)
                .where(
                    and_(
                        rollout_devices.c.rollout_id == rollout_id,
                        rollout_devices.c.device_id == device,
                    )
                )
                .values(step=step, version=version, detail=detail, updated_at=now)
            )
            conn.execute(update(rollouts).where(rollouts.c.id == rollout_id).values(updated_at=now))

    def finish(self, rollout_id: int, state: str, reason: str | None = None) -> None:
        """Mark a rollout ``halted`` or ``completed`` and free its bundle for a new one."""
        if state not in ("halted", "completed"):
            raise FleetError(f"a rollout cannot finish as {state!r}")
        with self._begin() as conn:
            conn.execute(
                update(rollouts)
                .where(rollouts.c.id == rollout_id)
                .values(state=state, reason=reason, active_key=None, updated_at=utcnow())
            )

    def rollout(self, rollout_id: int) -> RolloutRecord:
        """One rollout with its devices."""
        with self._connect() as conn:
            row = conn.execute(select(rollouts).where(rollouts.c.id == rollout_id)).first()
            if row is None:
                raise FleetError(f"no rollout {rollout_id}")
            steps = conn.execute(
                select(rollout_devices)
                .where(rollout_devices.c.rollout_id == rollout_id)
                .order_by(rollout_devices.c.position)
            )
            return _record(row._mapping, [_step(s._mapping) for s in steps])

    def rollouts(self, limit: int = 20) -> list[RolloutRecord]:
        """The newest rollouts first."""
        with self._connect() as conn:
            ids = list(
                conn.scalars(select(rollouts.c.id).order_by(rollouts.c.id.desc()).limit(limit))
            )
        return [self.rollout(int(i)) for i in ids]

    def count(self) -> int:
        """How many rollouts are stored."""
        with self._connect() as conn:
            return int(conn.scalar(select(func.count()).select_from(rollouts)) or 0)

    # -- plumbing ----------------------------------------------------------------------------

    def _begin(self) -> Any:
        return _Wrapped(self.engine.begin)

    def _connect(self) -> Any:
        return _Wrapped(self.engine.connect)


class _Wrapped:
    """A connection context that turns database failures into one :class:`FleetError`."""

    def __init__(self, opener: Any) -> None:
        self._cm = opener()

    def __enter__(self) -> Any:
        try:
            return self._cm.__enter__()
        except SQLAlchemyError as exc:
            raise FleetError(f"fleet database: {_first_line(exc)}") from exc

    def __exit__(self, *exc: Any) -> bool:
        try:
            return bool(self._cm.__exit__(*exc))
        except SQLAlchemyError as err:
            raise FleetError(f"fleet database: {_first_line(err)}") from err


def _first_line(exc: BaseException) -> str:
    return str(getattr(exc, "orig", None) or exc).splitlines()[0]


def _step(m: Any) -> DeviceStep:
    version = m["version"]
    return DeviceStep(
        device_id=m["device_id"],
        position=int(m["position"]),
        wave=int(m["wave"]),
        step=m["step"],
        version=None if version is None else int(version),
        detail=m["detail"],
        updated_at=m["updated_at"],
    )


def _record(m: Any, steps: list[DeviceStep]) -> RolloutRecord:
    return RolloutRecord(
        id=int(m["id"]),
        bundle=BundleRef(m["bundle_sha256"], m["bundle_name"], int(m["bundle_version"])),
        target=json.loads(m["target"]),
        canary=int(m["canary"]),
        wave_size=int(m["wave_size"]),
        state=m["state"],
        reason=m["reason"],
        owner=m["owner"],
        heartbeat_at=m["heartbeat_at"],
        created_at=m["created_at"],
        updated_at=m["updated_at"],
        devices=steps,
    )
