"""``python -m deploy.messages [--write | --check]``: the shipped JSON Schemas from the models."""

from __future__ import annotations

import argparse
import sys

from deploy.messages.catalog import SCHEMA_NAMES, drifted, render, write_all
from deploy.messages.vocabulary import DASHBOARD_VOCABULARY, render_vocabulary


def main(argv: list[str] | None = None) -> int:
    """Print one schema, ``--write`` them all (and the dashboard vocabulary), or ``--check``."""
    parser = argparse.ArgumentParser(prog="python -m deploy.messages", description=__doc__)
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--write", action="store_true", help="rewrite deploy/schemas/*.json")
    group.add_argument("--check", action="store_true", help="exit 1 when a file has drifted")
    parser.add_argument("name", nargs="?", choices=SCHEMA_NAMES, help="print this schema")
    args = parser.parse_args(argv)
    if args.write:
        for path in write_all():
            sys.stdout.write(f"wrote {path}\n")
        DASHBOARD_VOCABULARY.write_text(render_vocabulary(), "utf-8")
        sys.stdout.write(f"wrote {DASHBOARD_VOCABULARY}\n")
        return 0
    if args.check:
        bad = drifted()
        if DASHBOARD_VOCABULARY.read_text("utf-8") != render_vocabulary():
            bad.append("dashboard vocabulary")
        if bad:
            sys.stderr.write(f"out of date (run --write): {', '.join(bad)}\n")
            return 1
        return 0
    sys.stdout.write(render(args.name or "result"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
