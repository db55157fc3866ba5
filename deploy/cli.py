"""The ``omis`` command: one entry point, subcommands contributed by each package.

Thin by design: each subcommand parses arguments, calls a library function and formats the
result.  Machine-readable output goes to stdout (``--json``), logs to stderr.  Errors from the
project's exception trees become one line on stderr and a non-zero exit; anything else is a bug
and keeps its traceback.

Subcommand modules are imported here, so they must stay light: no torch, TensorRT or pycuda at
module level (device-side subcommands work without torch installed).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Callable, Sequence

from firmware_bridge.exceptions import BridgeError
from inference.exceptions import InferenceError
from inference.state_dir import DEFAULT_STATE_DIR

log = logging.getLogger("omis")

# Each module defines ``register(subparsers, common)``; order is the order of ``omis --help``.
COMMAND_MODULES = (
    "inference.cli",
    "inference.cli_device",
    "inference.cli_acquire",
    "firmware_bridge.cli",
    "training.cli",
    "deploy.commands",
    "deploy.cli_ota",
    "deploy.cli_demo",
)

EXIT_ERROR = 1
EXIT_USAGE = 2

Handler = Callable[[argparse.Namespace], int]


class CliError(Exception):
    """A user-facing error raised by a subcommand: printed as one line, exit code 1."""


def _known_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [CliError, BridgeError, InferenceError]
    for dotted in ("training.exceptions:TrainingError", "deploy.exceptions:DeployError"):
        module_name, _, cls_name = dotted.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        errors.append(getattr(module, cls_name))
    return tuple(errors)


def common_parent() -> argparse.ArgumentParser:
    """Options every subcommand accepts."""
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument(
        "--state-dir",
        help=f"on-device state directory (default: $OMIS_STATE_DIR or {DEFAULT_STATE_DIR})",
    )
    parent.add_argument("-v", "--verbose", action="count", default=0, help="more logging")
    parent.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    return parent


def build_parser() -> argparse.ArgumentParser:
    """The full ``omis`` parser with every subcommand registered."""
    parser = argparse.ArgumentParser(
        prog="omis",
        description="omis-edge: OMIS spectra, training, edge inference and the scanning appliance.",
    )
    from deploy import __version__

    parser.add_argument("--version", action="version", version=f"omis-edge {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    common = common_parent()
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub, common)
    return parser


def _setup_logging(args: argparse.Namespace) -> None:
    level = logging.INFO
    if getattr(args, "quiet", False):
        level = logging.WARNING
    elif getattr(args, "verbose", 0):
        level = logging.DEBUG
    logging.basicConfig(
        level=level,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``omis`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args)
    handler: Handler = args.handler
    try:
        return handler(args)
    except _known_errors() as exc:
        print(f"omis {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print(f"omis {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
