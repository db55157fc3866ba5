"""Subcommands of ``omis`` contributed by this package (see ``deploy/cli.py``)."""

from __future__ import annotations

import argparse
from typing import Any


def register(sub: argparse._SubParsersAction[Any], common: argparse.ArgumentParser) -> None:
    """Add this package's subcommands to ``omis``."""
