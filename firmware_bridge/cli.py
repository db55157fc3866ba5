"""Subcommands of ``omis`` contributed by this package (see ``deploy/cli.py``)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from firmware_bridge.sim.dataset import SynthRequest, SynthResult


def register(sub: argparse._SubParsersAction[Any], common: argparse.ArgumentParser) -> None:
    """Add this package's subcommands to ``omis``."""
    _register_dataset(sub, common)


# -- omis dataset ------------------------------------------------------------------------------


def _register_dataset(
    sub: argparse._SubParsersAction[Any], common: argparse.ArgumentParser
) -> None:
    """``omis dataset synth``: the synthetic dataset generator."""
    dataset = sub.add_parser(
        "dataset",
        parents=[common],
        help="datasets: synthesise (synth) or export signed-out slides from the archive",
        description="Datasets for training and tests; synth writes simulated slides.",
    )
    actions = dataset.add_subparsers(dest="dataset_command", metavar="ACTION", required=True)
    synth = actions.add_parser(
        "synth",
        parents=[common],
        help="write simulated W/P field pairs and manifest.csv",
        description="Write a synthetic OMIS dataset (see docs/simulator.md).",
    )
    synth.add_argument("--out", required=True, help="output directory (must not exist or be empty)")
    synth.add_argument("--slides", type=int, required=True, help="number of slides")
    synth.add_argument("--seed", type=int, default=0, help="dataset seed (default 0)")
    synth.add_argument("--fields", type=int, default=5, help="fields per slide (default 5)")
    synth.add_argument("--size", default="1280x1024", help="image WIDTHxHEIGHT (default 1280x1024)")
    synth.add_argument(
        "--groups",
        help="Pap group proportions, e.g. II=141,III=112,IV=42,V=146 (default: the study's),"
        " scaled to --slides",
    )
    synth.add_argument(
        "--difficulty",
        default="1.0",
        help="group overlap: a number (0 = none, 1 = default, 2 = harder) or a preset:"
        " 'study' = calibrated to the study's sensitivity/specificity (docs/simulator.md)",
    )
    synth.add_argument(
        "--workers", type=int, default=None, help="worker processes (default: usable CPUs)"
    )
    synth.add_argument("--json", action="store_true", help="print a JSON summary on stdout")
    synth.set_defaults(handler=_dataset_synth)


def _dataset_synth(args: argparse.Namespace) -> int:
    # imported here so that ``omis --help`` stays fast
    from firmware_bridge.sim.dataset import (
        SynthRequest,
        check_request,
        make_config,
        parse_difficulty,
        parse_groups,
        parse_size,
        synthesize,
    )

    # None means "not given"; 0 goes on to check_request, which refuses it (no silent default).
    workers = max(1, len(os.sched_getaffinity(0))) if args.workers is None else args.workers
    knobs, preset = parse_difficulty(args.difficulty)
    req = SynthRequest(
        out=Path(args.out),
        slides=args.slides,
        seed=args.seed,
        fields=args.fields,
        size=parse_size(args.size),
        groups=None if args.groups is None else parse_groups(args.groups),
        config=make_config(**knobs),
        workers=min(workers, max(args.slides, 1)),
        difficulty_preset=preset,
    )
    check_request(req)  # before the progress bar, so that bad input gives one line
    result = synthesize(req) if args.quiet else _synth_with_progress(req)
    if args.json:
        print(json.dumps(result.to_json(), indent=2, allow_nan=False))
    else:
        counts = ", ".join(f"{g}={n}" for g, n in result.counts.items())
        print(
            f"wrote {result.slides} slides x {result.fields} fields ({counts}) to {result.out}"
            f" in {result.seconds:.1f} s"
        )
    return 0


def _synth_with_progress(req: SynthRequest) -> SynthResult:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    from firmware_bridge.sim.dataset import synthesize

    columns = (
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=Console(file=sys.stderr), transient=False) as bar:
        task = bar.add_task("synth slides", total=req.slides)

        def advance(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        return synthesize(req, advance)
