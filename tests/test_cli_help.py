"""``omis`` explains itself: every subcommand and every option has a help line."""

from __future__ import annotations

import argparse
from collections.abc import Iterator

import pytest

from deploy.cli import build_parser


def _commands(
    parser: argparse.ArgumentParser, path: tuple[str, ...] = ("omis",)
) -> Iterator[tuple[tuple[str, ...], argparse.ArgumentParser, str | None]]:
    """(path, parser, the help line its parent lists) for every (sub)command, depth first."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            listed = {choice.dest: choice.help for choice in action._choices_actions}
            for name, sub in action.choices.items():
                yield (*path, name), sub, listed.get(name)
                yield from _commands(sub, (*path, name))


COMMANDS = list(_commands(build_parser()))


def _has_text(text: str | None) -> bool:
    return bool(text and text.strip() and text != argparse.SUPPRESS)


def test_the_walk_finds_nested_subcommands() -> None:
    paths = {" ".join(path) for path, _, _ in COMMANDS}
    assert {"omis spectrum", "omis engine build", "omis ota install", "omis dataset synth"} <= paths


@pytest.mark.parametrize("path,parser,listed", COMMANDS, ids=[" ".join(c[0]) for c in COMMANDS])
def test_every_subcommand_has_a_help_line_and_a_description(
    path: tuple[str, ...], parser: argparse.ArgumentParser, listed: str | None
) -> None:
    assert _has_text(listed), f"{' '.join(path)} has no help line in its parent's list"
    assert _has_text(parser.description), f"{' '.join(path)} --help shows no description"


@pytest.mark.parametrize("path,parser,listed", COMMANDS, ids=[" ".join(c[0]) for c in COMMANDS])
def test_every_option_has_a_help_line(
    path: tuple[str, ...], parser: argparse.ArgumentParser, listed: str | None
) -> None:
    missing = [
        "/".join(action.option_strings) or action.dest
        for action in parser._actions
        if not isinstance(action, argparse._SubParsersAction) and not _has_text(action.help)
    ]
    assert not missing, f"{' '.join(path)}: options without help: {missing}"
