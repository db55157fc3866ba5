"""``omis fleet``: device groups and staged rollouts, kept in the archive (docs/fleet.md)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

Handler = Any


def register(sub: argparse._SubParsersAction[Any], common: argparse.ArgumentParser) -> None:
    """Add ``omis fleet`` with ``group``, ``rollout`` and ``status``."""
    p = sub.add_parser(
        "fleet",
        parents=[common],
        help="device groups and staged model rollouts across devices",
        description="Staged rollouts of a signed bundle: canary devices first, then the rest in "
        "waves; the first rejection, rollback or silent device halts it.  State lives in the "
        "archive database, so a restarted rollout resumes where it stopped.",
    )
    verbs = p.add_subparsers(dest="fleet_command", metavar="VERB", required=True)

    def leaf(name: str, handler: Handler, text: str) -> argparse.ArgumentParser:
        q: argparse.ArgumentParser = verbs.add_parser(
            name, parents=[common], help=text, description=text
        )
        q.add_argument("--db", help="archive database URL (default: the collector's)")
        q.add_argument("--config", help="collector YAML configuration (for its database)")
        q.add_argument("--json", action="store_true", help="machine-readable output on stdout")
        q.set_defaults(handler=handler)
        return q

    text = "define device groups (rollouts can target a group)"
    g = verbs.add_parser("group", parents=[common], help=text, description=text)
    gverbs = g.add_subparsers(dest="group_command", metavar="VERB", required=True)
    for name, handler, text in (
        ("add", _group_add, "add devices to a group (created on first use)"),
        ("remove", _group_remove, "remove devices (or, with none named, the whole group)"),
        ("list", _group_list, "list groups and their devices"),
    ):
        q = gverbs.add_parser(name, parents=[common], help=text, description=text)
        q.add_argument("--db", help="archive database URL (default: the collector's)")
        q.add_argument("--config", help="collector YAML configuration (for its database)")
        q.add_argument("--json", action="store_true", help="machine-readable output on stdout")
        if name != "list":
            q.add_argument("group", help="group name")
            q.add_argument("devices", nargs="*", metavar="DEVICE", help="device ids")
        q.set_defaults(handler=handler)

    r = leaf("rollout", _rollout, "offer a bundle to devices in waves, canary first")
    r.add_argument("--bundle", required=True, help="signed bundle .tar (omis bundle pack)")
    who = r.add_mutually_exclusive_group(required=True)
    who.add_argument("--devices", help="comma-separated device ids, in rollout order")
    who.add_argument("--group", help="a device group (omis fleet group add)")
    r.add_argument("--canary", type=int, default=1, help="devices in the first wave (default 1)")
    r.add_argument(
        "--wave-size", type=int, default=0, help="devices per later wave (default 0: all the rest)"
    )
    r.add_argument("--broker", default="mqtt://127.0.0.1:1883", help="mqtt://host:port")
    r.add_argument("--prefix", default="omis/v1", help="topic prefix")
    r.add_argument(
        "--state-wait", type=float, default=5.0, help="seconds to wait for a device's ota/state"
    )
    r.add_argument(
        "--reply-wait", type=float, default=120.0, help="seconds to wait for a device's reply"
    )
    r.add_argument(
        "--outcome-wait",
        type=float,
        default=900.0,
        help="seconds to wait for a device's final outcome (its health period included)",
    )

    s = leaf("status", _status, "rollouts with each device's wave, step and version")
    s.add_argument("--rollout", type=int, help="one rollout (default: the newest few)")
    s.add_argument("--limit", type=int, default=5, help="how many rollouts (default 5)")


def _store(args: argparse.Namespace) -> Any:
    from deploy.collector.config import load_collector_config
    from deploy.collector.db import migrate, open_engine
    from deploy.fleet.store import FleetStore
    from inference.state_dir import resolve_state_dir

    overrides = {"database": {"url": args.db}} if args.db else {}
    config = load_collector_config(args.config, overrides=overrides)
    engine = open_engine(config.database_url(resolve_state_dir(args.state_dir)))
    migrate(engine)
    return FleetStore(engine)


def _print(args: argparse.Namespace, data: Any, text: str) -> None:
    if args.json:
        print(json.dumps(data, indent=2, allow_nan=False))
    else:
        print(text)


def _group_add(args: argparse.Namespace) -> int:
    store = _store(args)
    added = store.add_to_group(args.group, args.devices)
    members = store.groups()[args.group]
    _print(
        args,
        {"group": args.group, "added": added, "devices": members},
        f"group {args.group}: {len(members)} device(s) ({added} added): {', '.join(members)}",
    )
    return 0


def _group_remove(args: argparse.Namespace) -> int:
    removed = _store(args).remove_from_group(args.group, args.devices)
    _print(
        args, {"group": args.group, "removed": removed}, f"group {args.group}: {removed} removed"
    )
    return 0


def _group_list(args: argparse.Namespace) -> int:
    groups = _store(args).groups()
    lines = [f"{name}: {', '.join(devices)}" for name, devices in groups.items()]
    _print(args, groups, "\n".join(lines) or "no groups")
    return 0


def _rollout(args: argparse.Namespace) -> int:
    from deploy.broker import parse_broker_url
    from deploy.exceptions import FleetError
    from deploy.fleet.offer import MqttOfferer
    from deploy.fleet.rollout import RolloutRunner
    from deploy.fleet.store import BundleRef, check_device, plan_waves
    from deploy.ota.signing import opened
    from deploy.ota.unpack import is_archive
    from inference.bundle import load_bundle, sha256_file

    archive = Path(args.bundle)
    if not archive.is_file() or not is_archive(archive):
        raise FleetError(f"--bundle {archive}: not a bundle .tar (omis bundle pack DIR OUT.tar)")
    store = _store(args)
    if args.group:
        devices = store.group_devices(args.group)
        target: dict[str, Any] = {"group": args.group, "devices": devices}
    else:
        devices = [check_device(d.strip()) for d in args.devices.split(",") if d.strip()]
        target = {"devices": devices}
    waves = plan_waves(devices, args.canary, args.wave_size)
    with opened(archive) as root:
        bundle = load_bundle(root)
    ref = BundleRef(sha256_file(archive), bundle.manifest.name, bundle.manifest.version)
    record, resumed = store.begin_rollout(ref, target, waves, args.canary, args.wave_size)
    print(
        f"rollout {record.id}: {ref.name} v{ref.version} to {len(devices)} device(s) in "
        f"{len(waves)} wave(s){' (resumed)' if resumed else ''}",
        file=sys.stderr,
        flush=True,
    )
    offerer = MqttOfferer(
        parse_broker_url(args.broker),
        args.prefix,
        archive,
        ref.version,
        state_wait_s=args.state_wait,
        reply_wait_s=args.reply_wait,
        outcome_wait_s=args.outcome_wait,
    )
    runner = RolloutRunner(
        store, offerer, progress=lambda msg, _s: print(f"  {msg}", file=sys.stderr, flush=True)
    )
    result = runner.run(record.id)
    summary = result.reason or f"completed: {len(devices)} device(s) on v{ref.version}"
    _print(args, result.record.as_json(), f"rollout {record.id} {summary}")
    return 1 if result.halted else 0


def _status(args: argparse.Namespace) -> int:
    store = _store(args)
    records = [store.rollout(args.rollout)] if args.rollout else store.rollouts(args.limit)
    data = [r.as_json() for r in records]
    lines: list[str] = []
    for r in records:
        lines.append(
            f"rollout {r.id}: {r.bundle.name} v{r.bundle.version} {r.state}"
            + (f" - {r.reason}" if r.reason else "")
        )
        for number, wave in enumerate(r.waves()):
            for d in wave:
                version = "-" if d.version is None else f"v{d.version}"
                lines.append(f"  wave {number}  {d.device_id:<24} {d.step:<12} {version}")
    _print(args, data, "\n".join(lines) or "no rollouts")
    return 0
