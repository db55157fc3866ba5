"""Subcommands of ``omis`` contributed by this package (see ``deploy/cli.py``): scan, serve."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from deploy.appliance.base import ScanRequest, SlideScanner
from deploy.appliance.health import check_health
from deploy.broker import parse_broker_url
from deploy.config import AppConfig, load_config
from deploy.exceptions import ConfigError, DeployError
from deploy.messages.vocabulary import OUTCOMES
from firmware_bridge.limits import MAX_SLIDES, check_count, check_identifier
from inference.state_dir import resolve_state_dir

log = logging.getLogger(__name__)


EXIT_UNHEALTHY = 1


def _state_dir(args: argparse.Namespace, config: AppConfig) -> Path:
    """The state directory (:func:`inference.state_dir.resolve_state_dir`)."""
    return resolve_state_dir(args.state_dir, config.device.state_dir)


def _config(args: argparse.Namespace) -> AppConfig:
    """The configuration file (if any) + environment + command-line overrides."""
    overrides: dict[str, Any] = {}
    for option, section, key in (
        ("device_id", "device", "id"),
        ("broker", "mqtt", "broker"),
        ("microscope", "scan", "microscope"),
        ("bundle", "scan", "bundle"),
        ("fields", "scan", "fields"),
    ):
        value = getattr(args, option, None)
        if value is not None:
            overrides.setdefault(section, {})[key] = value
    config = load_config(getattr(args, "config", None), overrides=overrides)
    parse_broker_url(config.mqtt.broker)  # fail early, naming the URL
    return config


def _scanner(config: AppConfig, state_dir: Path, first_boot: bool = False) -> SlideScanner:
    """``--bundle`` pins a bundle for this run; else the model store's active model serves
    (and OTA updates switch it between slides).  ``first_boot`` (``omis serve``) lets an empty
    model store wait for its first model over OTA."""
    from deploy.scanner import MicroscopeScanner
    from deploy.serving import active_bundle_path

    if config.scan.bundle is None and not first_boot:
        active_bundle_path(state_dir)  # fail early, in one line, when nothing is installed
    return MicroscopeScanner(
        config.scan.microscope,
        config.scan.bundle,
        state_dir,
        inference=config.inference,
        plans=config.scan.plans,
        allow_no_model=first_boot,
        min_usable_fields=config.scan.min_usable_fields,
    )


def _install_signals(stop: Callable[[], None]) -> None:
    def handler(signum: int, frame: object) -> None:
        log.info("signal %d: stopping", signum)
        stop()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


# ------------------------------------------------------------------------------------ serve


def cmd_serve(args: argparse.Namespace) -> int:
    """The appliance daemon (or --validate-config / --health)."""
    if args.validate_config:
        try:
            config = _config(args)
        except ConfigError as exc:
            print(f"config error: {exc}", file=sys.stderr)
            return 1
        print("OK")
        return 0
    config = _config(args)
    state_dir = _state_dir(args, config)
    if args.health:
        healthy, reason = check_health(state_dir, config.service.health_interval_s)
        print(("OK " if healthy else "UNHEALTHY ") + reason)
        return 0 if healthy else EXIT_UNHEALTHY
    from deploy.appliance.service import Appliance
    from deploy.daemon_lock import DaemonLock

    with DaemonLock(state_dir):  # first: a second daemon must not touch anything
        app = Appliance(config, state_dir, _scanner(config, state_dir, first_boot=True))
        _install_signals(app.request_stop)
        try:
            app.start()
            app.run()
        finally:
            app.shutdown()
    return 0


# ------------------------------------------------------------------------------------- scan


def _requests(args: argparse.Namespace, config: AppConfig) -> list[ScanRequest]:
    fields = config.scan.fields
    if args.slides is not None:
        check_count(args.slides, "--slides", MAX_SLIDES)
    if args.slide_id is not None:
        check_identifier(args.slide_id, "--slide-id")
        return [ScanRequest(args.slide_id, fields, config.scan.plan, "cli")]
    if config.scan.microscope.startswith("sim://"):
        from deploy.scanner import sim_seed
        from firmware_bridge.sim.sample import slide_id_for

        seed = sim_seed(config.scan.microscope)
        ids = [slide_id_for(i, seed) for i in range(args.slides or 1)]
    else:
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
        ids = [f"{config.device.id}-{stamp}-{i + 1:03d}" for i in range(args.slides or 1)]
    return [ScanRequest(slide, fields, config.scan.plan, "cli") for slide in ids]


def _scan_report(app: Any, requests: list[ScanRequest]) -> dict[str, Any]:
    by_scan = {c.scan_id: c for c in app.committed}
    rows: list[dict[str, Any]] = []
    for request in requests:
        committed = by_scan.get(request.scan_id)
        if committed is None:  # the run was interrupted before this scan started
            rows.append(
                {"slide_id": request.slide_id, "delivery": "failed", "error": "not scanned"}
            )
            continue
        state = app.outbox.state_of(committed.message_id)
        pending = state == "pending"
        rows.append(
            {
                "slide_id": request.slide_id,
                "scan_id": request.scan_id,
                "message_id": committed.message_id,
                "seq": committed.seq,
                "outcome": committed.outcome,
                "reason": committed.reason,
                "label": committed.label,
                "side": committed.side,
                "delivery": "stored" if pending else "acknowledged",
                # the archive's receipt arrived (the outbox deleted the row); False while the
                # row waits for it (or when receipts are off and the PUBACK deleted it)
                "archived": state is None and app.config.outbox.receipts,
            }
        )
    counts = {
        k: sum(r["delivery"] == k for r in rows) for k in ("acknowledged", "stored", "failed")
    }
    seen = [r.get("outcome") for r in rows]
    outcomes = {o: seen.count(o) for o in OUTCOMES if o in seen}
    return {
        "device_id": app.identity.device_id,
        "boot_id": app.identity.boot_id,
        "broker": str(app.link.address) if app.link else None,
        "outbox": str(app.outbox.path),
        "results": rows,
        "summary": counts,
        "outcomes": outcomes,
    }


def _outcome_words(row: dict[str, Any]) -> str:
    """``classified high``, ``abstained (no_usable_field)``, ``failed: <reason>``, ..."""
    outcome = row["outcome"]
    if outcome == "classified":
        return f"classified {row['label']}"
    if outcome == "abstained":
        leaning = f", leaning {row['side']}" if row.get("side") else ""
        return f"abstained ({row['reason']}){leaning}"
    return f"{outcome}: {row['reason']}"


def _print_scan_report(report: dict[str, Any]) -> None:
    words = {
        "acknowledged": "acknowledged by the broker",
        "stored": f"stored in the outbox {report['outbox']} (sent when the broker is reachable)",
    }
    for row in report["results"]:
        if row["delivery"] == "failed":
            print(f"slide {row['slide_id']}: FAILED: {row['error']}")
            continue
        archive = ""
        if row["delivery"] == "acknowledged":
            archive = (
                "; stored by the archive (receipt)"
                if row["archived"]
                else "; kept in the outbox until the archive's receipt"
            )
        print(
            f"slide {row['slide_id']}: {_outcome_words(row)}  seq {row['seq']}  "
            f"message {row['message_id']}  {words[row['delivery']]}{archive}"
        )
    s = report["summary"]
    print(
        f"{len(report['results'])} slide(s): {s['acknowledged']} acknowledged, "
        f"{s['stored']} stored in the outbox, {s['failed']} failed"
    )


def cmd_scan(args: argparse.Namespace) -> int:
    """Scan slides headless and publish one result per slide."""
    if args.slides is not None and args.slides < 1:
        raise ConfigError("--slides must be at least 1")
    config = _config(args)
    config.scan.queue_size = max(config.scan.queue_size, 1)
    config.scan.scan_on_insert = False  # the CLI scans exactly what it was asked to
    requests = _requests(args, config)  # ids and counts checked before anything starts
    state_dir = _state_dir(args, config)
    from deploy.appliance.service import Appliance

    app = Appliance(config, state_dir, _scanner(config, state_dir))
    _install_signals(app.request_stop)
    try:
        app.start()
        app.run_batch(requests, ack_timeout_s=args.ack_timeout)
        if args.receipt_wait > 0 and app.pump is not None and config.outbox.receipts:
            app.pump.wait_receipts([c.message_id for c in app.committed], args.receipt_wait)
        report = _scan_report(app, requests)
    finally:
        app.shutdown()
    if args.json:
        print(json.dumps(report, indent=2, allow_nan=False))
    else:
        _print_scan_report(report)
    broken = report["summary"]["failed"] + sum(
        n for o, n in report["outcomes"].items() if o in ("failed", "cancelled")
    )
    if broken:
        raise DeployError(f"{broken} slide(s) failed or were cancelled (see above)")
    return 0


# --------------------------------------------------------------------------------- register


def _add_shared(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML configuration file (see docs/configuration.md)")
    p.add_argument("--broker", help="mqtt://host:port, mqtts://host:port or embedded[:port]")
    p.add_argument("--microscope", help="microscope URL: sim://, serial://..., replay://DIR")
    p.add_argument(
        "--bundle", help="model bundle for this run (default: the model store's active model)"
    )
    p.add_argument("--device-id", help="device id in topics and results")
    p.add_argument("--fields", type=int, help="fields per slide")


def register(sub: argparse._SubParsersAction[Any], common: argparse.ArgumentParser) -> None:
    """Add this package's subcommands to ``omis``."""
    scan = sub.add_parser(
        "scan",
        parents=[common],
        help="headless scan: acquire, classify and publish one result per slide",
        description="Headless scan: acquire, compute and classify each slide and publish one "
        "result per slide; exits 0 once every result is acknowledged by the broker or stored in "
        "the outbox (it says which).",
    )
    _add_shared(scan)
    which = scan.add_mutually_exclusive_group()
    which.add_argument("--slides", type=int, help="number of slides to scan (default 1)")
    which.add_argument("--slide-id", help="scan one slide with this id")
    scan.add_argument(
        "--ack-timeout",
        type=float,
        default=10.0,
        help="seconds to wait for PUBACKs before leaving results in the outbox",
    )
    scan.add_argument(
        "--receipt-wait",
        type=float,
        default=0.0,
        help="also wait up to this many seconds for the archive's receipts (the report says "
        "which results the archive confirmed); results without one stay in the outbox",
    )
    scan.add_argument("--json", action="store_true", help="machine-readable report on stdout")
    scan.set_defaults(handler=cmd_scan, slides=None)

    serve = sub.add_parser(
        "serve",
        parents=[common],
        help="the appliance daemon: scan commands, results over MQTT, status",
        description="The appliance daemon: waits for scan commands and OTA offers over MQTT, "
        "publishes results, status and metrics (see docs/deploy.md and docs/mqtt.md).",
    )
    _add_shared(serve)
    serve.add_argument(
        "--validate-config", action="store_true", help="check the configuration, print OK"
    )
    serve.add_argument(
        "--health", action="store_true", help="query the running daemon's health file"
    )
    serve.set_defaults(handler=cmd_serve)
