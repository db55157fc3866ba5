"""``omis train --repeats N``: the same run with N seeds, and the spread of every figure.

One run's ranking of models is noise on small data (across 5 seeds spectrum1d minus logistic
regression ranged from -0.003 to +0.074 AUC).  With ``--repeats N`` the run is repeated with
seeds ``seed, seed+1, ..., seed+N-1`` (folds, weights, shuffling and calibration split all
change with it); each run is written complete to ``OUT/seed-S/``, and ``OUT/repeats.json`` /
``OUT/repeats.md`` give, for every model's figures and every paired comparison with the
network, the mean, the sample SD, the minimum and the maximum over the seeds.
"""

from __future__ import annotations

import logging
import statistics
from collections.abc import Callable, Iterable
from typing import Any

from firmware_bridge.fsutil import atomic_directory, atomic_write_text
from training.exceptions import ConfigError
from training.options import TrainOptions
from training.report import write_json

log = logging.getLogger(__name__)

FIGURES = (
    "roc_auc",
    "sensitivity",
    "specificity",
    "accuracy",
    "referral_rate",
    "sensitivity_decided",
    "specificity_decided",
    "sensitivity_with_review",
    "specificity_with_review",
)
RunFn = Callable[[TrainOptions], dict[str, Any]]


def _value(v: Any) -> float | None:
    if isinstance(v, dict):
        v = v.get("value")
    return None if v is None else float(v)


def figures_of(report: dict[str, Any]) -> dict[str, float | None]:
    """Flat ``model.figure`` and ``comparison`` values of one report."""
    out: dict[str, float | None] = {}
    models = {report.get("model", "network"): report["cnn"], **report.get("baselines", {})}
    for name, res in models.items():
        pooled = res.get("pooled") if isinstance(res, dict) else None
        if pooled is None:
            continue
        for key in FIGURES:
            if key in pooled:
                out[f"{name}.{key}"] = _value(pooled[key])
    comp = report.get("comparison", {})
    for other, tests in comp.get("paired_with_network", {}).items():
        delong = tests.get("delong", {})
        out[f"network_minus_{other}.auc_difference"] = _value(delong.get("auc_difference"))
        out[f"network_vs_{other}.delong_p"] = _value(delong.get("p_value"))
        out[f"network_vs_{other}.mcnemar_p"] = _value(tests.get("mcnemar", {}).get("p_value"))
    op = report.get("shipped_operating_point") or {}
    shipped = op.get("held_out") or op.get("cross_fitted") or {}
    for key in (
        "referral_rate",
        "sensitivity_decided",
        "specificity_decided",
        "sensitivity_with_review",
        "specificity_with_review",
        "sensitivity_at_decision",
        "specificity_at_decision",
        "roc_auc",
    ):
        if key in shipped:
            out[f"shipped.{key}"] = _value(shipped[key])
    if op.get("validated_referral_rate"):
        out["shipped.validated_referral_rate"] = _value(op["validated_referral_rate"])
    return out


def spread(values: Iterable[float | None]) -> dict[str, Any]:
    """Mean, sample SD, min and max of the non-null values, and how many there were."""
    v = [x for x in values if x is not None]
    if not v:
        return {"n": 0, "mean": None, "sd": None, "min": None, "max": None}
    return {
        "n": len(v),
        "mean": statistics.fmean(v),
        "sd": statistics.stdev(v) if len(v) > 1 else None,
        "min": min(v),
        "max": max(v),
    }


def aggregate(reports: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """``repeats.json``: per seed figures and their spread."""
    per_seed = {seed: figures_of(r) for seed, r in reports.items()}
    keys = sorted({k for f in per_seed.values() for k in f})
    return {
        "schema": "omis.train-repeats/1",
        "seeds": sorted(reports),
        "figures": {k: spread(per_seed[s].get(k) for s in per_seed) for k in keys},
        "per_seed": {str(s): f for s, f in per_seed.items()},
        "note": "mean, sample SD and range over the seeds; every seed is a complete run "
        "(seed-S/report.json)",
    }


def markdown(agg: dict[str, Any]) -> str:
    """``repeats.md``: one row per figure."""
    lines = [
        f"# Repeated training runs (seeds {', '.join(map(str, agg['seeds']))})",
        "",
        "| figure | n | mean | SD | min | max |",
        "|---|---|---|---|---|---|",
    ]

    def f(v: float | None) -> str:
        return "n/a" if v is None else f"{v:.4f}"

    for key, s in agg["figures"].items():
        lines.append(
            f"| {key} | {s['n']} | {f(s['mean'])} | {f(s['sd'])} | {f(s['min'])} | {f(s['max'])} |"
        )
    return "\n".join(lines) + "\n"


def run_repeats(opts: TrainOptions, repeats: int, run: RunFn) -> dict[str, Any]:
    """Run ``run`` for each seed into ``OUT/seed-S`` and write the aggregate (atomically)."""
    if repeats < 2:
        raise ConfigError("--repeats needs at least 2 runs")
    out = opts.out
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"--out {out} exists and is not an empty directory")
    if out.is_dir():
        out.rmdir()
    reports: dict[int, dict[str, Any]] = {}
    with atomic_directory(out) as tmp:
        for i in range(repeats):
            seed = opts.seed + i
            log.info("repeat %d/%d: seed %d", i + 1, repeats, seed)
            reports[seed] = run(opts.model_copy(update={"seed": seed, "out": tmp / f"seed-{seed}"}))
        agg = aggregate(reports)
        write_json(tmp / "repeats.json", agg)
        atomic_write_text(tmp / "repeats.md", markdown(agg))
    return agg
