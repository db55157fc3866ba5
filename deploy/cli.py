"""The ``omis`` command: one entry point, subcommands contributed by each package.

Thin by design: each subcommand parses arguments, calls a library function and formats the
result.  Machine-readable output goes to stdout (``--json``), logs to stderr.  No traceback
reaches a user: errors from the project's exception trees (and ``OSError``) become one line on
stderr and exit code 1; anything else is a bug, logged with its traceback at DEBUG and reported
as one line with a hint to rerun with ``-v`` (exit code 3).  Usage errors exit 2 (argparse),
SIGINT 130 and SIGTERM 143; both signals unwind the handler, so partial outputs are removed.

Subcommand modules are imported here, so they must stay light: no torch, TensorRT or pycuda at
module level (device-side subcommands work without torch installed).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import signal
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TextIO

from deploy.redact import redact
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
    "deploy.cli_dataset",
    "training.cli",
    "training.cli_validate",
    "deploy.commands",
    "deploy.cli_ota",
    "deploy.cli_demo",
    "deploy.cli_collect",
    "deploy.cli_fleet",
)

EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_INTERNAL = 3
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143

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


class LiveStderrHandler(logging.StreamHandler[TextIO]):
    """Writes each record to ``sys.stderr`` as it is at that moment, one plain line per record.

    While a rich live display draws (progress bars, the demo's table) it replaces ``sys.stderr``
    with a proxy that prints whole lines above the display.  A handler that kept the stream it was
    created with would write into the bars instead, gluing the record onto the bar's last line.
    """

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    def emit(self, record: logging.LogRecord) -> None:
        """Write ``record`` to the current ``sys.stderr`` (called with the handler's lock held)."""
        self.stream = sys.stderr
        super().emit(record)


class RedactingFormatter(logging.Formatter):
    """A formatter that masks URL passwords and registered secrets (:mod:`deploy.redact`)."""

    def format(self, record: logging.LogRecord) -> str:
        """The record as text, secrets masked (tracebacks included)."""
        return redact(super().format(record))


def configure_logging(level: int) -> None:
    """Log records of ``level`` and above to stderr as ``time LEVEL logger: message``."""
    handler = LiveStderrHandler()
    handler.setFormatter(RedactingFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level, handlers=[handler])


def _setup_logging(args: argparse.Namespace) -> None:
    level = logging.INFO
    if getattr(args, "quiet", False):
        level = logging.WARNING
    elif getattr(args, "verbose", 0):
        level = logging.DEBUG
    configure_logging(level)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that every ``finally`` and cleanup handler runs."""


def _raise_terminated(signum: int, frame: object) -> None:
    raise Terminated


@contextmanager
def _sigterm_unwinds() -> Iterator[None]:
    """Turn SIGTERM into :class:`Terminated` while a handler runs (commands like ``serve``
    install their own graceful handler on top)."""
    try:
        previous = signal.signal(signal.SIGTERM, _raise_terminated)
    except ValueError:  # not the main thread (tests calling main() from a worker)
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def one_line(text: str) -> str:
    """``text`` with its lines joined, so an error is always exactly one line; secrets masked."""
    return redact(" | ".join(line.strip() for line in str(text).splitlines() if line.strip()))


def _os_error_text(exc: OSError) -> str:
    where = exc.filename if exc.filename is not None else ""
    what = exc.strerror or str(exc)
    return f"{where}: {what}" if where else what


def _run(args: argparse.Namespace) -> int:
    handler: Handler = args.handler
    name = f"omis {args.command}"
    try:
        return handler(args)
    except _known_errors() as exc:
        print(f"{name}: error: {one_line(str(exc))}", file=sys.stderr)
        return EXIT_ERROR
    except OSError as exc:
        print(f"{name}: error: {one_line(_os_error_text(exc))}", file=sys.stderr)
        return EXIT_ERROR
    except Terminated:
        print(f"{name}: terminated", file=sys.stderr)
        return EXIT_TERMINATED
    except KeyboardInterrupt:
        print(f"{name}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:  # the last line of defence: a bug, reported in one line
        log.debug("unexpected error in %s", name, exc_info=True)
        print(
            f"{name}: internal error: {type(exc).__name__}: {one_line(str(exc))[:300]} "
            "(rerun with -v for the traceback)",
            file=sys.stderr,
        )
        return EXIT_INTERNAL


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``omis`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args)
    with _sigterm_unwinds():
        return _run(args)


if __name__ == "__main__":
    sys.exit(main())
