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
    actions = p.add_subparsers(dest="collect_action", metavar="{user}")
    _register_user(actions, common)


ROLES_HELP = "viewer < operator < cytotech < pathologist < admin (docs/collector.md)"


def _register_user(
    actions: argparse._SubParsersAction[Any], common: argparse.ArgumentParser
) -> None:
    user = actions.add_parser(
        "user",
        help="archive accounts: add, list, disable, API tokens",
        description="People who use the archive's API and dashboard, stored in the archive "
        f"database, each with a role: {ROLES_HELP}.",
    )
    db = argparse.ArgumentParser(add_help=False)
    db.add_argument("--config", dest="user_config", help="YAML configuration (its database)")
    db.add_argument("--db", dest="user_db", help="sqlite:///PATH or postgresql://user@host/db")
    verbs = user.add_subparsers(dest="user_action", metavar="VERB", required=True)
    add = verbs.add_parser(
        "add",
        parents=[common, db],
        help="add a user (password on stdin, or prompted)",
        description="Add a user; the password is read from stdin (or prompted on a terminal) "
        "and stored as an argon2id hash.",
    )
    add.add_argument("name", help="user name (A-Z a-z 0-9 _ . @ -, up to 64)")
    add.add_argument("--role", required=True, help=ROLES_HELP)
    add.set_defaults(handler=_cmd_user_add)
    listing = verbs.add_parser(
        "list", parents=[common, db], help="list users", description="List users and roles."
    )
    listing.add_argument("--json", action="store_true", help="JSON on stdout")
    listing.set_defaults(handler=_cmd_user_list)
    disable = verbs.add_parser(
        "disable",
        parents=[common, db],
        help="disable a user",
        description="Disable a user: refused from the next request on; sessions and API "
        "tokens end. The user and what they did stay in the archive.",
    )
    disable.add_argument("name", help="user name")
    disable.set_defaults(handler=_cmd_user_disable)
    imported = verbs.add_parser(
        "import",
        parents=[common, db],
        help="copy the configuration's http.accounts into the archive",
        description="Copy every http.accounts entry of --config (name, role, password hash) "
        "into the archive's users, skipping names that exist; then delete the list from the "
        "configuration.",
    )
    imported.set_defaults(handler=_cmd_user_import)
    token = verbs.add_parser(
        "token",
        parents=[common, db],
        help="print a new API token for a user",
        description="Create an API token (Authorization: Bearer) for a program acting as the "
        "user; printed once, only its digest is stored.",
    )
    token.add_argument("name", help="user name")
    token.add_argument("--label", help="what the token is for (shown in the audit trail)")
    token.set_defaults(handler=_cmd_user_token)


def _user_store(args: argparse.Namespace) -> Any:
    from deploy.collector.auth import UserStore
    from deploy.collector.config import load_collector_config
    from deploy.collector.db import migrate, open_engine
    from inference.state_dir import resolve_state_dir

    overrides = {"database": {"url": args.user_db}} if args.user_db else None
    config = load_collector_config(args.user_config, overrides=overrides)
    engine = open_engine(config.database_url(resolve_state_dir(args.state_dir)))
    migrate(engine)
    return UserStore(engine)


def _cli_actor() -> Any:
    from deploy.collector.audit import Actor

    try:
        who = getpass.getuser()
    except (KeyError, OSError):
        who = "unknown"
    return Actor(f"cli:{who}"[:64], "admin", None)


def _read_password() -> str:
    from deploy.exceptions import ConfigError

    if sys.stdin.isatty():
        password = getpass.getpass("password: ")
        if getpass.getpass("again: ") != password:
            raise ConfigError("password: the two entries differ")
    else:
        password = sys.stdin.readline().rstrip("\r\n")
    if not password:
        raise ConfigError("password: empty (give it on stdin)")
    return password


def _user_call(call: Any) -> Any:
    from deploy.exceptions import ConfigError

    try:
        return call()
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc


def _cmd_user_add(args: argparse.Namespace) -> int:
    store = _user_store(args)
    password = _read_password()
    _user_call(lambda: store.add(args.name, args.role, password, _cli_actor()))
    print(f"user {args.name} added ({args.role})", file=sys.stderr)
    return 0


def _cmd_user_list(args: argparse.Namespace) -> int:
    import json

    found = _user_store(args).list()
    if args.json:
        print(json.dumps(found, indent=2, allow_nan=False))
        return 0
    for user in found:
        state = "disabled" if user["disabled"] else "enabled"
        print(f"{user['name']:<24} {user['role']:<12} {state}")
    return 0


def _cmd_user_disable(args: argparse.Namespace) -> int:
    _user_store(args).disable(args.name, _cli_actor())
    print(f"user {args.name} disabled", file=sys.stderr)
    return 0


def _cmd_user_token(args: argparse.Namespace) -> int:
    print(_user_store(args).new_token(args.name, args.label, _cli_actor()))
    return 0


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


def _cmd_user_import(args: argparse.Namespace) -> int:
    from deploy.collector.config import load_collector_config
    from deploy.exceptions import ArchiveError

    accounts = load_collector_config(args.user_config).http.accounts
    if not accounts:
        print("no http.accounts in the configuration: nothing to import", file=sys.stderr)
        return 0
    store, actor = _user_store(args), _cli_actor()
    for account in accounts:
        try:
            # the hash moves as it is: scrypt hashes keep verifying
            store.add(account.name, account.role, "-", actor, hashed=account.password_hash)
        except ArchiveError:
            print(f"user {account.name} exists already: skipped", file=sys.stderr)
            continue
        print(f"user {account.name} imported ({account.role})", file=sys.stderr)
    print("now delete http.accounts from the configuration", file=sys.stderr)
    return 0
