"""Log lines and progress bars share stderr without gluing onto each other."""

from __future__ import annotations

import io
import logging
import re
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from deploy.cli import configure_logging
from training.progress import Progress

_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


class FakeTerminal(io.StringIO):
    """What a terminal receives, byte for byte; rich treats it as an interactive terminal."""

    def isatty(self) -> bool:
        return True


@contextmanager
def terminal_stderr(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeTerminal]:
    """stderr is a terminal and the root logger has no handler yet (as in a fresh ``omis``).

    Entered inside the test body: pytest sets sys.stderr and its log handlers per phase.
    """
    term = FakeTerminal()
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    root.handlers.clear()
    try:
        with monkeypatch.context() as patch:
            patch.setattr(sys, "stderr", term)
            patch.setenv("TERM", "xterm")
            yield term
    finally:
        for handler in root.handlers:
            handler.close()
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])


def _screen_lines(raw: str) -> list[str]:
    """Each output line as it ends up on screen: after its last carriage return, no escapes."""
    return [_ANSI.sub("", line.rsplit("\r", 1)[-1]) for line in raw.split("\n")]


def test_log_lines_print_above_a_live_progress_bar(monkeypatch: pytest.MonkeyPatch) -> None:
    log = logging.getLogger("training.data")
    with terminal_stderr(monkeypatch) as terminal:
        configure_logging(logging.INFO)
        with Progress(enabled=True) as progress, progress.task("spectra") as tick:
            for done in range(1, 4):
                tick(done, 10)
                time.sleep(0.25)  # the bar redraws 10 times a second: it is on screen now
                log.info("marker %d", done)
    lines = _screen_lines(terminal.getvalue())
    for done in range(1, 4):
        hits = [line for line in lines if f"marker {done}" in line]
        assert len(hits) == 1, (done, lines)
        assert "spectra" not in hits[0] and "━" not in hits[0], hits[0]
        assert re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO training\.data: ", hits[0])
