"""``omis collect``: the result archive (see :mod:`deploy.collector` and docs/collector.md)."""

from __future__ import annotations

import argparse
import faulthandler
import getpass
import signal
import sys
import threading
from typing import Any


def register(sub: argparse._SubParsersAction[Any], common: argparse.ArgumentParser) -> None:
    """Add ``omis collect``."""
    p = sub.add_parser(
        "collect",
        parents=[common],
        help="archive every result (SQLite or PostgreSQL) and serve it over an HTTP API",
        description="The result archive: a persistent MQTT 5 session with a shared "
        "subscription stores every result exactly once and serves results, CSV, FHIR, devices "
        "and alerts over HTTP (and the dashboard).",
    )
    p.add_argument("--config", help="YAML configuration (docs/collector.md)")
    p.add_argument("--broker", help="mqtt://host:port or mqtts://host:port")
    p.add_argument(
        "--db",
        help="sqlite:///PATH (default: STATE_DIR/collector.sqlite) or postgresql://user@host/db",
    )
    p.add_argument("--http", metavar="HOST:PORT", help="API address (default 127.0.0.1:8080)")
    p.add_argument("--prefix", help="topic prefix (default omis/v1)")
    p.add_argument("--client-id", help="MQTT client id (stable per instance)")
    p.add_argument("--group", help="shared-subscription group (default omis-archive)")
    p.add_argument(
        "--validate-config",
        action="store_true",
        help="check the configuration (file, environment, flags), print it without secrets, exit",
    )
    p.add_argument(
        "--hash-password",
        action="store_true",
        help="read a password (stdin or prompt), print its hash for http.accounts, exit",
    )
    p.set_defaults(handler=_cmd_collect)


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    from deploy.exceptions import ConfigError

    mqtt = {
        key: value
        for key, value in (
            ("broker", args.broker),
            ("prefix", args.prefix),
            ("client_id", args.client_id),
            ("group", args.group),
        )
        if value is not None
    }
    out: dict[str, Any] = {"mqtt": mqtt} if mqtt else {}
    if args.db is not None:
        out["database"] = {"url": args.db}
    if args.http is not None:
        host, sep, port = args.http.rpartition(":")
        if not sep or not port.isdigit() or not host:
            raise ConfigError(f"--http: expected HOST:PORT, got {args.http!r}")
        out["http"] = {"host": host.strip("[]"), "port": int(port)}
    return out


def _cmd_collect(args: argparse.Namespace) -> int:
    from deploy.collector.auth import hash_password
    from deploy.collector.config import load_collector_config, shown
    from deploy.collector.service import ArchiveService
    from inference.state_dir import resolve_state_dir

    if args.hash_password:
        password = getpass.getpass() if sys.stdin.isatty() else sys.stdin.readline().rstrip("\n")
        print(hash_password(password))
        return 0
    config = load_collector_config(args.config, overrides=_overrides(args))
    if args.validate_config:
        print(shown(config))
        return 0
    # A fatal signal (SIGBUS from a storage fault the checks in deploy.collector.db did not
    # foresee, SIGSEGV) still leaves its name and the Python stack on stderr.
    faulthandler.enable()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    service = ArchiveService(config, resolve_state_dir(args.state_dir))
    try:
        service.start()
        print(
            f"omis collect: archiving into {service.db_display}; "
            f"API and dashboard on {service.http_url}",
            file=sys.stderr,
            flush=True,
        )
        service.run(stop)
    except KeyboardInterrupt:
        pass
    finally:
        service.close()
    return 0
