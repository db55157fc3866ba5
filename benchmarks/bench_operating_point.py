"""Does the shipped bundle keep its operating point on slides no part of training saw?

Simulates a training set and, with another simulator seed, a set of new slides from the same
distribution; runs ``omis train … --repeats N``; then scores the new slides with every seed's
bundle exactly as the device would (``omis validate``: spectrum, QC, thresholds, abstain band)
and prints, per seed, what the bundle promised (its validated referral bound, from its held-out
calibration split) beside what it did on the new slides (referral rate, sensitivity and
specificity on decided slides, AUC; Wilson 95 %).

    .venv/bin/python benchmarks/bench_operating_point.py --slides 160 --new 400 --repeats 3
    .venv/bin/python benchmarks/bench_operating_point.py --slides 441 --difficulty study \\
        --fields 5 --new 400 --repeats 2

Options: ``--preset`` (tiny), ``--folds`` (3), ``--max-referral`` (0.2), ``--data-seed`` (11),
``--new-seed`` (99), ``--size`` (320x256), ``--work DIR`` (keep the data and runs there;
default a temporary directory), ``--json OUT``.  The load average before and after is printed:
training time depends on it, the figures do not (training is deterministic per seed).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
OMIS = [sys.executable, "-m", "deploy.cli"]


def omis(*args: str) -> str:
    """Run one ``omis`` command; its stdout, or exit with its stderr."""
    proc = subprocess.run(
        [*OMIS, *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        check=False,
    )
    if proc.returncode != 0:
        sys.exit(
            f"omis {args[0]} {args[1] if len(args) > 1 else ''} failed:\n{proc.stderr[-3000:]}"
        )
    return proc.stdout


def _pct(p: dict[str, Any] | None) -> str:
    if not p or p.get("value") is None:
        return "n/a"
    lo, hi = p["ci95"]
    return f"{100 * p['value']:.1f} % [{100 * lo:.1f}, {100 * hi:.1f}]"


def synth(out: Path, slides: int, seed: int, args: argparse.Namespace) -> None:
    """One simulated dataset (kept when it already exists under --work)."""
    if (out / "manifest.csv").exists():
        return
    extra = ["--difficulty", args.difficulty] if args.difficulty else []
    omis(
        "dataset", "synth", "--out", str(out), "--slides", str(slides), "--fields",
        str(args.fields), "--size", args.size, "--seed", str(seed), "-q", *extra,
    )  # fmt: skip


def row(seed_dir: Path, new: Path, work: Path) -> dict[str, Any]:
    """What one seed's bundle promised and what it did on the new slides."""
    report = json.loads((seed_dir / "report.json").read_text())
    op = report["shipped_operating_point"]
    bound = op["thresholds"].get("referral_bound") or {}
    lock = work / f"lock-{seed_dir.parent.name}-{seed_dir.name}.json"
    lock.unlink(missing_ok=True)
    scored = json.loads(
        omis(
            "validate",
            "--bundle",
            str(seed_dir / "bundle"),
            "--data",
            str(new),
            "--json",
            "--lock",
            str(lock),
        )
    )
    return {
        "seed": seed_dir.name if seed_dir.name.startswith("seed-") else "seed-0",
        "calibration_slides": op["slides"],
        "slides_in_band": bound.get("slides_in_band"),
        "validated_referral_bound": (op.get("validated_referral_rate") or {}).get("value"),
        "new_slides": scored["n"],
        "referral_rate": scored["referral_rate"],
        "sensitivity_decided": scored["sensitivity"],
        "specificity_decided": scored["specificity"],
        "roc_auc": scored["roc_auc"],
        "held_out_on_split": op.get("held_out"),
        "collapsed": op.get("collapsed"),
        "final_attempts": len(report["final_model"].get("attempts") or [1]),
    }


def main() -> int:
    """Train, score the new slides with each seed's bundle, print the table."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--slides", type=int, default=160)
    ap.add_argument("--new", type=int, default=400)
    ap.add_argument("--fields", type=int, default=3)
    ap.add_argument("--size", default="320x256")
    ap.add_argument("--difficulty", default=None)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--folds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--max-referral", type=float, default=0.2)
    ap.add_argument("--data-seed", type=int, default=11)
    ap.add_argument("--new-seed", type=int, default=99)
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-op-") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        load_before = os.getloadavg()
        data, new = work / f"train-{args.data_seed}", work / f"new-{args.new_seed}"
        synth(data, args.slides, args.data_seed, args)
        synth(new, args.new, args.new_seed, args)
        runs = work / f"runs-{args.preset}-{int(time.time())}"
        t0 = time.perf_counter()
        epochs = ["--epochs", str(args.epochs)] if args.epochs else []
        omis(
            "train", "--data", str(data), "--out", str(runs), "--preset", args.preset,
            "--folds", str(args.folds), "--seed", "0", "--repeats", str(args.repeats),
            "--max-referral", str(args.max_referral), "-q", *epochs,
        )  # fmt: skip
        train_s = time.perf_counter() - t0
        seeds = sorted(runs.glob("seed-*")) or [runs]  # --repeats 1 writes one plain run
        rows = [row(d, new, work) for d in seeds]
        load_after = os.getloadavg()
    print(
        f"{args.slides} training slides, {args.new} new slides (simulator seeds "
        f"{args.data_seed} / {args.new_seed}, difficulty {args.difficulty or 'default'}), "
        f"preset {args.preset}, --max-referral {args.max_referral}; training {train_s:.0f} s; "
        f"load average {load_before[0]:.1f} before, {load_after[0]:.1f} after"
    )
    print(
        "| seed | promised (bound, in band / split) | referred on new slides | sens. decided "
        "| spec. decided | AUC | final fits |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        bound = r["validated_referral_bound"]
        promised = "n/a" if bound is None else f"≤ {100 * bound:.1f} %"
        auc = r["roc_auc"]["value"] if isinstance(r["roc_auc"], dict) else r["roc_auc"]
        print(
            f"| {r['seed']} | {promised} ({r['slides_in_band']}/{r['calibration_slides']}) | "
            f"{_pct(r['referral_rate'])} | {_pct(r['sensitivity_decided'])} | "
            f"{_pct(r['specificity_decided'])} | {auc:.3f} | {r['final_attempts']} |"
        )
    held = [r["referral_rate"]["value"] <= args.max_referral for r in rows]
    print(f"referral bound held on the new slides in {sum(held)} of {len(rows)} seeds")
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "args": vars(args) | {"work": str(args.work), "json": str(args.json)},
                    "rows": rows,
                },
                indent=2,
                default=str,
                allow_nan=False,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
