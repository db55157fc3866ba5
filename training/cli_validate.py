"""``omis validate``: locked validation of a bundle on a dataset, and the sample-size helper.

torch is never imported: validation runs the device's code (ONNX Runtime).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from training.exceptions import ConfigError


def register(sub: argparse._SubParsersAction[Any], common: argparse.ArgumentParser) -> None:
    """Add ``omis validate``."""
    p = sub.add_parser(
        "validate",
        parents=[common],
        help="locked validation: score a bundle on a dataset as the device would",
        description="Scores every slide of DATA with the bundle exactly as the device would "
        "(its spectrum, QC, thresholds, abstain band and out_of_range), after writing a lock "
        "record (bundle sha256, thresholds, data digest, time) before any label is read.  "
        "Reports the referral rate, sensitivity and specificity (on decided slides and with "
        "referrals counted as reviewed), AUC with DeLong's interval, patient-level and per-site "
        "figures.  --plan prints the slides a validation needs instead.",
    )
    p.add_argument("--bundle", type=Path, help="model bundle directory")
    p.add_argument("--data", type=Path, help="dataset directory (an omis dataset export)")
    p.add_argument(
        "--lock",
        type=Path,
        help="lock record: checked when it exists, else written there "
        "(default DATA/validation-locks/<bundle>-<data>.json)",
    )
    p.add_argument("--cache-dir", type=Path, help="spectrum cache for raw-field datasets")
    p.add_argument("--seed", type=int, default=0, help="seed of the cluster bootstrap")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--plan", action="store_true", help="print the slides needed and exit")
    p.add_argument("--sensitivity", type=float, help="--plan: expected sensitivity")
    p.add_argument("--specificity", type=float, help="--plan: expected specificity (optional)")
    p.add_argument("--margin", type=float, help="--plan: half-width of the 95 %% interval")
    p.add_argument("--prevalence", type=float, help="--plan: share of high-risk slides")
    p.set_defaults(handler=_cmd_validate)


def _cmd_validate(args: argparse.Namespace) -> int:
    if args.plan:
        return _plan(args)
    if args.bundle is None or args.data is None:
        raise ConfigError("--bundle and --data are required (or --plan)")
    from training.validate import validate

    report = validate(
        args.bundle, args.data, lock_path=args.lock, cache_dir=args.cache_dir, seed=args.seed
    )
    if args.json:
        print(json.dumps(report, indent=2, allow_nan=False))
    else:
        _print(report)
    return 0


def _plan(args: argparse.Namespace) -> int:
    from training.validate import sample_size

    missing = [o for o in ("sensitivity", "margin", "prevalence") if getattr(args, o) is None]
    if missing:
        raise ConfigError(f"--plan needs {', '.join('--' + m for m in missing)}")
    plan = sample_size(args.sensitivity, args.margin, args.prevalence, args.specificity)
    if args.json:
        print(json.dumps(plan, indent=2, allow_nan=False))
        return 0
    print(
        f"{plan['slides']} slides needed: {plan['positives_needed']} high-risk slides to "
        f"estimate a sensitivity of {args.sensitivity:g} within ±{args.margin:g} (95 %) at a "
        f"prevalence of {args.prevalence:g}"
        + (
            f"; {plan['negatives_needed']} low-risk slides for specificity {args.specificity:g}"
            if args.specificity is not None
            else ""
        )
    )
    return 0


def _fmt(p: dict[str, Any] | None) -> str:
    if not p or p.get("value") is None:
        return "n/a"
    lo, hi = p["ci95"]
    return f"{100 * p['value']:.1f}% [{100 * lo:.1f}, {100 * hi:.1f}] ({p['successes']}/{p['n']})"


def _print(r: dict[str, Any]) -> None:
    lock = r["lock"]
    b = r["bundle"]
    print(f"bundle {b['name']} v{b['version']} on {r['data']['path']} ({r['n']} slides)")
    print(f"locked {lock['created']}: {lock['path']} (sha256 {lock['sha256'][:12]}…)")
    o = r["outcomes"]
    counts = f"{o['classified']} classified, {o['abstained']} referred, {o['failed']} failed"
    print(f"  outcomes       {counts}")
    print(f"  referral rate  {_fmt(r['referral_rate'])}")
    print(f"  sensitivity    {_fmt(r['sensitivity'])} on decided slides")
    print(f"  specificity    {_fmt(r['specificity'])} on decided slides")
    print(f"  sensitivity    {_fmt(r['sensitivity_with_referrals'])} referrals counted as reviewed")
    print(f"  specificity    {_fmt(r['specificity_with_referrals'])} referrals counted as reviewed")
    auc = r["roc_auc"]
    if auc and auc.get("value") is not None:
        ci = auc.get("ci95")
        extra = f" [{ci[0]:.3f}, {ci[1]:.3f}] (DeLong)" if ci else ""
        print(f"  ROC AUC        {auc['value']:.3f}{extra}")
    if r["patient_level"]:
        pl = r["patient_level"]
        print(f"  patients       {pl['patients']}: sensitivity {_fmt(pl['sensitivity'])}")
    for site, f in (r["per_site"] or {}).items():
        se, sp = _fmt(f["sensitivity"]), _fmt(f["specificity"])
        print(f"  site {site}: sensitivity {se}, specificity {sp}")
