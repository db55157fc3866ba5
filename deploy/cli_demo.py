"""``omis demo``: the main job on simulated hardware (see :mod:`deploy.demo`)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def register(sub: argparse._SubParsersAction[Any], common: argparse.ArgumentParser) -> None:
    """Add ``omis demo``."""
    p = sub.add_parser(
        "demo",
        parents=[common],
        help="simulate, train (cached), scan a few simulated slides and show live MQTT results",
        description="Runs the whole product on simulated hardware: synthetic Pap smears, a "
        "tiny model trained on them (cached), an embedded MQTT broker, a headless scan through "
        "the simulated firmware, and a live table of the published results.",
    )
    p.add_argument("--slides", type=int, default=6, help="slides to scan (default 6)")
    p.add_argument("--fields", type=int, default=3, help="fields per slide (default 3)")
    p.add_argument("--seed", type=int, default=2026, help="simulation seed")
    p.add_argument("--cache-dir", type=Path, help="cache (default $OMIS_CACHE_DIR or ~/.cache)")
    p.add_argument("--fresh", action="store_true", help="ignore cached data and model")
    p.add_argument(
        "--dashboard",
        action="store_true",
        help="keep the broker and the result archive (dashboard, API) running until Ctrl-C",
    )
    p.add_argument(
        "--loop",
        action="store_true",
        help="the lab's data loop: scan, sign out (the simulator's truth standing in for a "
        "cytotechnologist), export, train a new model, validate it locked, compare both",
    )
    p.add_argument(
        "--loop-slides",
        type=int,
        default=24,
        help="--loop: slides of the first round (the second scans half as many; default 24)",
    )
    p.set_defaults(handler=_cmd_demo)


def _cmd_demo(args: argparse.Namespace) -> int:
    from deploy.demo import DemoConfig, default_cache_dir, run_demo

    if args.slides < 1 or args.fields < 1:
        from deploy.exceptions import DeployError

        raise DeployError("--slides and --fields must be at least 1")
    cfg = DemoConfig(
        cache_dir=args.cache_dir or default_cache_dir(),
        slides=args.slides,
        fields=args.fields,
        seed=args.seed,
        fresh=args.fresh,
        dashboard=args.dashboard,
    )
    if args.loop:
        from deploy.demo_loop import loop_config, run_loop

        if args.loop_slides < 8:
            from deploy.exceptions import DeployError

            raise DeployError("--loop-slides must be at least 8 (training needs both classes)")
        n = args.loop_slides
        return run_loop(loop_config(cfg, round1=n, round2=max(4, n // 2)))
    return run_demo(cfg)
