"""``omis dataset export``: the archive's signed-out slides as a training directory.

Added as an action of ``omis dataset`` (registered by ``firmware_bridge.cli``, which may not
import this package).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from deploy.exceptions import ConfigError

TOKEN_ENV = "OMIS_ARCHIVE_TOKEN"  # noqa: S105 (the variable's name, not a secret)


def _dataset_actions(sub: argparse._SubParsersAction[Any]) -> argparse._SubParsersAction[Any]:
    parser = sub.choices.get("dataset")
    if parser is None:
        raise ConfigError("omis dataset is not registered (firmware_bridge.cli must come first)")
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action
    raise ConfigError("omis dataset has no actions")


def register(sub: argparse._SubParsersAction[Any], common: argparse.ArgumentParser) -> None:
    """Add ``omis dataset export``."""
    p = _dataset_actions(sub).add_parser(
        "export",
        parents=[common],
        help="signed-out slides of the archive as a training directory (manifest.csv, spectra)",
        description="Write the archive's signed-out slides as a directory that omis train and "
        "omis validate read as it is: manifest.csv with the verdict's Pap group and the study "
        "columns, one spectrum file per slide, excluded.csv (slides not exported, with the "
        "reason) and export.json (query, row count, sha256).  See docs/training.md.",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--db", help="archive database URL (sqlite:///PATH or postgresql://…)")
    src.add_argument("--api", help="a running archive's base URL, e.g. http://127.0.0.1:8080")
    p.add_argument(
        "--token",
        help=f"--api: USER:PASSWORD (HTTP Basic) or an API token (default ${TOKEN_ENV}; the "
        "environment keeps it off the command line)",
    )
    p.add_argument("--out", required=True, type=Path, help="new (or empty) output directory")
    p.add_argument("--since", help="results finished at or after (RFC 3339)")
    p.add_argument("--until", help="results finished before (RFC 3339)")
    p.add_argument("--device", help="only this device id")
    p.add_argument(
        "--reviewed-only",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="only signed-out slides (default on; training needs a verdict per slide)",
    )
    p.add_argument(
        "--qa-sample-only",
        action="store_true",
        help="only slides the device decided itself (the quality-assurance sample)",
    )
    p.add_argument("--json", action="store_true", help="print export.json on stdout")
    p.set_defaults(handler=_cmd_export)


def _time(option: str, text: str | None) -> Any:
    from deploy.collector.store import parse_time

    if text is None:
        return None
    try:
        return parse_time(text)
    except ValueError:
        raise ConfigError(f"{option}: not an RFC 3339 time with a zone: {text!r}") from None


def _cmd_export(args: argparse.Namespace) -> int:
    from deploy.dataset_export import ExportQuery, from_api, from_database, write_export

    query = ExportQuery(
        since=_time("--since", args.since),
        until=_time("--until", args.until),
        device=args.device,
        reviewed_only=args.reviewed_only,
        qa_sample_only=args.qa_sample_only,
    )
    if args.db:
        from sqlalchemy.engine import make_url

        from deploy.collector.db import normalise_url

        source = make_url(normalise_url(args.db)).render_as_string(hide_password=True)
        selection = from_database(args.db, query)
    else:
        source = args.api
        import os

        selection = from_api(args.api, args.token or os.environ.get(TOKEN_ENV), query)
    record = write_export(selection, args.out, query, source)
    if args.json:
        print(json.dumps(record, indent=2, allow_nan=False))
    else:
        print(
            f"exported {record['rows']} slide(s) of {record['patients']} patient(s) to "
            f"{args.out} ({record['excluded']} excluded, see excluded.csv); sha256 "
            f"{record['sha256'][:12]}…"
        )
    return 0
