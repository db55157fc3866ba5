"""Subcommands of ``omis`` contributed by this package (see ``deploy/cli.py``).

``omis train``, ``omis export`` and ``omis evaluate``.  torch is imported inside the handlers
only: ``omis --help`` and the device-side subcommands must work without it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from inference.cli import json_object_arg
from training.exceptions import ConfigError


def register(sub: argparse._SubParsersAction[Any], common: argparse.ArgumentParser) -> None:
    """Add this package's subcommands to ``omis``."""
    _register_train(sub, common)
    _register_export(sub, common)
    _register_evaluate(sub, common)


# --- omis train --------------------------------------------------------------------------------


def _register_train(sub: argparse._SubParsersAction[Any], common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "train",
        parents=[common],
        help="train VGG16 on OMIS spectra, cross-validate, export a bundle and a report",
        description="Cross-validates (stratified, grouped by patient), runs the classical "
        "baselines on the same folds, trains the final model, exports ONNX and writes "
        "OUT/bundle, OUT/report.json, OUT/report.md, OUT/plots and OUT/config.json.  Run under "
        "torchrun for data-parallel training.",
    )
    p.add_argument("--data", required=True, type=Path, help="dataset directory (manifest.csv)")
    p.add_argument("--out", required=True, type=Path, help="new (or empty) output directory")
    p.add_argument(
        "--task",
        default="binary",
        choices=("binary", "pap4", "ii-v"),
        help="binary: II+III vs IV+V; pap4: the four groups; ii-v: Pap II vs V only",
    )
    p.add_argument(
        "--preset",
        default="tiny",
        choices=("paper", "tiny", "spectrum1d"),
        help="paper/tiny: VGG16 on the spectrum image; spectrum1d: a 1-D CNN on the spectrum",
    )
    p.add_argument("--folds", type=int, default=5, help="cross-validation folds (default 5)")
    p.add_argument("--epochs", type=int, help="maximum epochs (default: the preset's)")
    p.add_argument("--batch-size", type=int, help="per-process batch size (preset default)")
    p.add_argument("--lr", type=float, help="learning rate (preset default)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="no fallback")
    p.add_argument("--pretrained", type=Path, help="torchvision VGG16 state dict (.pth)")
    p.add_argument(
        "--from-scratch",
        action="store_true",
        help="paper preset: train from random weights (else --pretrained is required)",
    )
    p.add_argument("--freeze-features", action="store_true", help="train the head only")
    p.add_argument("--seed", type=int, default=0, help="seed of splits and training (default 0)")
    p.add_argument("--name", default="omis-vgg16", help="bundle name")
    p.add_argument("--version", type=int, default=1, help="bundle version (only grows)")
    p.add_argument("--max-slides", type=int, help="use the first M slides of the manifest")
    p.add_argument(
        "--final",
        default="all",
        choices=("all", "best-fold"),
        help="shipped model: retrained on all data (default) or the best fold's",
    )
    p.add_argument(
        "--target-sensitivity",
        type=float,
        default=0.9,
        help="sensitivity the decision threshold is chosen for, on validation data (0.9)",
    )
    p.add_argument(
        "--max-referral",
        type=float,
        default=0.2,
        help="largest share of slides the abstain band may refer to a person on new slides "
        "(default 0.2)",
    )
    p.add_argument(
        "--referral-confidence",
        type=float,
        default=0.95,
        help="probability with which the referral rate on new slides stays within "
        "--max-referral; the band holds at most as many validation slides as that allows "
        "(default 0.95)",
    )
    p.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="train N times with seeds SEED..SEED+N-1 into OUT/seed-S and report mean, SD and "
        "range of every figure in OUT/repeats.json and repeats.md (default 1)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads; the same command with the same count gives the same report "
        "(default 1)",
    )
    p.add_argument(
        "--temperature-scaling",
        action="store_true",
        help="fit a softmax temperature on validation data (baked into the exported model)",
    )
    p.add_argument(
        "--out-of-range",
        type=float,
        default=0.05,
        help="bundle threshold: fraction of a slide's spectral mass outside the render window "
        "above which the slide is unlike the training data (default 0.05)",
    )
    p.add_argument(
        "--render-params",
        help="image datasets: the render parameters the images were drawn with (JSON or @FILE)",
    )
    p.add_argument(
        "--allow-lossy", action="store_true", help="accept lossy (JPEG) images in the dataset"
    )
    p.add_argument("--spectrum-params", help="spectrum parameters: JSON object or @FILE")
    p.add_argument("--cache-dir", type=Path, help="spectrum cache (default DATA/.omis-cache)")
    p.add_argument("--no-cache", action="store_true", help="do not read or write the cache")
    p.add_argument(
        "--augment-noise",
        type=float,
        default=0.0,
        help="spectrum noise SD as a fraction of max|y| (default 0: off)",
    )
    p.add_argument(
        "--augment-scale",
        type=float,
        default=0.0,
        help="random intensity scaling 1 ± U(0, s) (default 0: off)",
    )
    p.add_argument(
        "--group-by",
        default="patient",
        choices=("patient", "device", "site"),
        help="cross-validation groups: patient (stratified K folds, default), or device/site "
        "(leave-one-group-out, from the manifest's device_id/site column)",
    )
    p.add_argument("--json", action="store_true", help="print the pooled metrics as JSON")
    p.set_defaults(handler=_cmd_train)


def _cmd_train(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from firmware_bridge.validation import first_error_parts
    from training.options import TrainOptions
    from training.pipeline import run_training
    from training.progress import Progress
    from training.train import Augment

    try:
        opts = TrainOptions(
            data=args.data,
            out=args.out,
            task=args.task,
            preset=args.preset,
            folds=args.folds,
            epochs=args.epochs,
            batch_size=args.batch_size,
            lr=args.lr,
            device=args.device,
            pretrained=args.pretrained,
            from_scratch=args.from_scratch,
            freeze_features=args.freeze_features,
            seed=args.seed,
            name=args.name,
            version=args.version,
            max_slides=args.max_slides,
            final=args.final,
            target_sensitivity=args.target_sensitivity,
            max_referral=args.max_referral,
            referral_confidence=args.referral_confidence,
            threads=args.threads,
            temperature_scaling=args.temperature_scaling,
            out_of_range=args.out_of_range,
            render_params=json_object_arg(args.render_params, "--render-params") or None,
            allow_lossy=args.allow_lossy,
            spectrum_params=json_object_arg(args.spectrum_params, "--spectrum-params") or None,
            cache_dir=args.cache_dir,
            no_cache=args.no_cache,
            augment=Augment(noise_std=args.augment_noise, scale=args.augment_scale),
            group_by=args.group_by,
        )
    except ValidationError as exc:
        where, message = first_error_parts(exc, "options")
        raise ConfigError(f"--{where.replace('_', '-')}: {message}") from exc
    if args.repeats != 1:
        return _repeated(opts, args)
    with Progress(enabled=not args.quiet and sys.stderr.isatty()) as progress:
        result = run_training(opts, progress)
    if not result.report.get("schema"):
        return 0  # a non-zero torchrun rank: rank 0 reports
    summary = _summary(result.report)
    summary.update(out=str(result.out), bundle=str(result.bundle), seconds=result.seconds)
    if args.json:
        print(json.dumps(summary, indent=2, allow_nan=False))
    else:
        _print_summary(summary)
    return 0


def _repeated(opts: Any, args: argparse.Namespace) -> int:
    """``--repeats N``: N complete runs and the spread of their figures."""
    from training.pipeline import run_training
    from training.repeats import run_repeats

    agg = run_repeats(opts, args.repeats, lambda o: run_training(o).report)
    if args.json:
        print(json.dumps(agg["figures"], indent=2, allow_nan=False))
    else:
        for key, s in agg["figures"].items():
            if s["mean"] is not None:
                sd = "n/a" if s["sd"] is None else f"{s['sd']:.4f}"
                print(f"{key:<48} mean {s['mean']:.4f}  SD {sd}  [{s['min']:.4f}, {s['max']:.4f}]")
        print(f"repeats: {opts.out}/repeats.md")
    return 0


def _summary(report: dict[str, Any]) -> dict[str, Any]:
    keys = ("sensitivity", "specificity", "accuracy", "referral_rate", "roc_auc")
    out: dict[str, Any] = {"cnn": {k: report[k] for k in keys}}
    for name, res in report["baselines"].items():
        if "pooled" in res:
            out[name] = {k: res["pooled"][k] for k in keys}
    return out


def _fmt(p: dict[str, Any]) -> str:
    if p.get("value") is None:
        return "     n/a           "
    lo, hi = p["ci95"]
    return f"{100 * p['value']:5.1f}% [{100 * lo:4.1f},{100 * hi:5.1f}]"


def _print_summary(summary: dict[str, Any]) -> None:
    print(
        f"{'model':<19} {'sensitivity':<21} {'specificity':<21} {'accuracy':<21} "
        f"{'referred':<21} AUC"
    )
    for name in ("cnn", "naive_bayes", "random_forest", "logistic_regression", "best_bin"):
        if name in summary:
            m = summary[name]
            auc = "n/a" if m["roc_auc"] is None else f"{m['roc_auc']:.3f}"
            print(
                f"{name:<19} {_fmt(m['sensitivity'])} {_fmt(m['specificity'])} "
                f"{_fmt(m['accuracy'])} {_fmt(m['referral_rate'])} {auc}"
            )
    print(
        f"bundle: {summary['bundle']}  report: {summary['out']}/report.md  "
        f"({summary['seconds']:.0f} s)"
    )


# --- omis export -------------------------------------------------------------------------------


def _register_export(sub: argparse._SubParsersAction[Any], common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "export",
        parents=[common],
        help="re-export a training checkpoint as a verified model bundle",
        description="Re-export a training checkpoint as a model bundle; the ONNX model is checked "
        "against the checkpoint's torch outputs.",
    )
    p.add_argument("--checkpoint", required=True, type=Path, help="OUT/checkpoints/*.pt")
    p.add_argument("--out", required=True, type=Path, help="bundle directory (must not exist)")
    p.add_argument("--name", help="override the bundle name")
    p.add_argument("--version", type=int, help="override the bundle version")
    p.add_argument("--json", action="store_true", help="print the bundle description as JSON")
    p.set_defaults(handler=_cmd_export)


def _cmd_export(args: argparse.Namespace) -> int:
    from training.checkpoint import export_checkpoint

    bundle, diff = export_checkpoint(
        args.checkpoint, args.out, name=args.name, version=args.version
    )
    desc = {**bundle.describe(), "path": str(args.out), "onnx_vs_torch_max_abs_diff": diff}
    if args.json:
        print(json.dumps(desc, indent=2, allow_nan=False))
    else:
        print(
            f"bundle {desc['name']} v{desc['version']} written to {args.out} "
            f"(model sha256 {desc['sha256'][:12]}…, ONNX vs torch max diff {diff:.2g})"
        )
    return 0


# --- omis evaluate -----------------------------------------------------------------------------


def _register_evaluate(
    sub: argparse._SubParsersAction[Any], common: argparse.ArgumentParser
) -> None:
    p = sub.add_parser(
        "evaluate",
        parents=[common],
        help="evaluate a bundle (ONNX Runtime) on a dataset with the bundle's own parameters",
        description="Classify every slide of a dataset with a bundle (ONNX Runtime, the bundle's "
        "own spectrum and render parameters) and report the metrics.",
    )
    p.add_argument("--bundle", required=True, type=Path, help="model bundle directory")
    p.add_argument("--data", required=True, type=Path, help="dataset directory (manifest.csv)")
    p.add_argument("--cache-dir", type=Path, help="spectrum cache (default DATA/.omis-cache)")
    p.add_argument("--no-cache", action="store_true", help="recompute every spectrum")
    p.add_argument("--max-slides", type=int, help="use the first M slides of the manifest")
    p.add_argument("--json", action="store_true", help="print all metrics as JSON")
    p.set_defaults(handler=_cmd_evaluate)


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from training.evaluate import evaluate_bundle

    cache = None if args.no_cache else (args.cache_dir or args.data / ".omis-cache")
    result = evaluate_bundle(args.bundle, args.data, cache_dir=cache, max_slides=args.max_slides)
    if args.json:
        print(json.dumps(result, indent=2, allow_nan=False))
        return 0
    m = result["metrics"]
    b = result["bundle"]
    print(f"bundle {b['name']} v{b['version']} on {result['data']} ({m['n']} slides)")
    for key in ("sensitivity", "specificity", "accuracy"):
        print(f"  {key:<12} {_fmt(m[key])}")
    auc = "n/a" if m["roc_auc"] is None else f"{m['roc_auc']:.3f}"
    print(f"  {'roc_auc':<12} {auc}")
    print(f"  confusion    {m['confusion_matrix']} (rows true, columns predicted)")
    return 0
