"""What a training run writes besides the bundle: report.json, report.md, predictions.csv, plots.

``predictions.csv`` has one row per slide, out of fold: ``slide_id, patient_id, pap_group,
fold, truth``, then ``p_high_<model>`` for the network and every baseline, then the network's
``threshold`` (chosen on that fold's validation slides), ``decision`` (``high``/``low``) and
``abstained`` (inside the fold's abstain band), then for every model its fold's
``threshold_<model>``, ``abstain_low_<model>`` and ``abstain_high_<model>``.  Numbers are
written at full precision (``repr``: the file reproduces the report's figures exactly).
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
import torch

from firmware_bridge.fsutil import atomic_write_text
from training.compare import auc_with_interval, delong_paired, mcnemar_paired, per_patient
from training.crossval import ModelRun, Scored
from training.export import code_revision
from training.metrics import high_risk_probability
from training.report import (
    markdown,
    plot_confusions,
    plot_losses,
    plot_mean_spectra,
    plot_reliability,
    plot_roc,
    write_json,
)
from training.window import Inputs, discriminative_coverage, render_coverage

if TYPE_CHECKING:
    from training.options import TrainOptions
    from training.prepared import Prepared
    from training.train import FitConfig

F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]
Network = tuple[str, Scored, ModelRun]
RUN_ONLY = ("cache_hits", "cache_misses")
REFERRAL_KEYS = (
    "referral_rate",
    "sensitivity_decided",
    "specificity_decided",
    "sensitivity_with_review",
    "specificity_with_review",
)
Baselines = dict[str, tuple[Scored, ModelRun] | str]


def _models(network: Network, baselines: Baselines) -> dict[str, tuple[Scored, ModelRun]]:
    name, scored, run = network
    out = {name: (scored, run)}
    out.update({k: v for k, v in baselines.items() if not isinstance(v, str)})
    return out


def comparison(
    labels: I64, high: Sequence[int], network: Network, baselines: Baselines
) -> dict[str, Any]:
    """AUC with DeLong intervals for every model; paired tests of the network against each."""
    positive = np.isin(labels, list(high))
    models = _models(network, baselines)
    scores = {k: high_risk_probability(run.probs, high) for k, (_, run) in models.items()}
    correct = {k: (scores[k] >= sc.slide_threshold) == positive for k, (sc, _) in models.items()}
    name = network[0]
    paired = {
        k: {
            "delong": delong_paired(positive, scores[name], scores[k]),
            "mcnemar": mcnemar_paired(correct[name], correct[k]),
        }
        for k in models
        if k != name
    }
    auc = {k: auc_with_interval(positive, s) for k, s in scores.items()}
    base = [k for k in models if k != name and auc[k]["value"] is not None]
    best = max(base, key=lambda k: auc[k]["value"]) if base else None
    return {
        "auc": auc,
        "network": name,
        "paired_with_network": paired,
        "best_baseline": best,
        "network_auc_not_below_best_baseline": (
            None
            if best is None or auc[name]["value"] is None
            else bool(auc[name]["value"] >= auc[best]["value"])
        ),
        "against_best_baseline": _verdict(name, best, paired),
        "note": "AUC intervals and paired AUC test: DeLong; accuracy of the risk decisions at "
        "each model's validation-chosen thresholds: McNemar (exact)",
    }


SIGNIFICANCE = 0.05


def _verdict(name: str, best: str | None, paired: dict[str, Any]) -> str | None:
    """One sentence: the network against the best baseline, from this run's DeLong test."""
    if best is None:
        return None
    d = paired[best]["delong"]
    diff, p = d["auc_difference"], d["p_value"]
    if diff is None or p is None:
        return f"{name} against {best}: not testable on these slides"
    if p >= SIGNIFICANCE:
        how = "within noise of"
    else:
        how = "significantly above" if diff > 0 else "significantly below"
    return (
        f"{name} is {how} the best baseline, {best} (AUC difference {diff:+.3f}, DeLong "
        f"p = {p:.2g}); one run: rank models only on --repeats runs"
    )


def _discriminative(
    p: Prepared, inp: Inputs, fold_inputs: Sequence[Inputs], folds: Any
) -> dict[str, Any] | None:
    """Share of the class-separating signal inside the window (training.window)."""
    if p.ys is None or p.axis is None:
        return None
    return {
        "shipped_window_all_slides": discriminative_coverage(p.axis, p.ys, p.labels, inp.render),
        "per_fold_test_slides": [
            discriminative_coverage(p.axis, p.ys[te], p.labels[te], fi.render)
            for fi, (_, te) in zip(fold_inputs, folds, strict=True)
        ],
        "per_fold_training_slides": [
            discriminative_coverage(p.axis, p.ys[tr], p.labels[tr], fi.render)
            for fi, (tr, _) in zip(fold_inputs, folds, strict=True)
        ],
        "definition": "share of the per-bin between-class variance share (eta squared above "
        "chance) that lies inside the render window",
    }


def _coverage(p: Prepared, inp: Inputs, fold_inputs: Sequence[Inputs], folds: Any) -> Any:
    if p.ys is None or p.axis is None:
        return None, None
    classes = p.task.classes
    whole = render_coverage(p.axis, p.ys, p.labels, classes, inp.render)
    per_fold = [
        render_coverage(p.axis, p.ys[te], p.labels[te], classes, fi.render)
        for fi, (_, te) in zip(fold_inputs, folds, strict=True)
    ]
    return whole, per_fold


def data_record(p: Prepared, data_dir: Path) -> dict[str, Any]:
    """``report.json`` → ``data``: what was read, prepared and used for this task."""
    return {
        # cache use describes this run, not its result: config.json has it
        **{k: v for k, v in p.ds.stats.to_json().items() if k not in RUN_ONLY},
        # after the preparation counts: ``slides_used`` is what this task trained on
        "slides_prepared": p.ds.stats.slides_used,
        "dir": str(data_dir),
        "kind": p.ds.kind,
        "slides_used": len(p.ds.slides),
        "slides_outside_task": p.outside_task,
        "patients": len(set(p.ds.patients)),
        "manifest_sha256": p.ds.manifest_sha256,
        "files_sha256": p.ds.files_sha256,
    }


def build_report(
    p: Prepared,
    opts: TrainOptions,
    folds: list[tuple[I64, I64]],
    *,
    network: Network,
    baselines: Baselines,
    final: dict[str, Any],
    inputs: tuple[Inputs, list[Inputs]],
    diff: float,
    world_size: int,
    device: str,
    shipped: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """report.json (schema ``omis.train-report/1``; keys documented in docs/training.md)."""
    name, net, run = network
    pooled = net.summary["pooled"]
    inp, fold_inputs = inputs
    coverage, coverage_folds = _coverage(p, inp, fold_inputs, folds)
    positive = np.isin(p.labels, list(p.task.high_classes))
    patients = {
        k: per_patient(
            p.ds.patients,
            positive,
            high_risk_probability(r.probs, p.task.high_classes),
            sc.slide_threshold,
        )
        for k, (sc, r) in _models(network, baselines).items()
    }
    warnings = [
        f"{k}: fold {f['fold']} collapsed: {f['collapse_reason']}"
        for k, (sc, _) in _models(network, baselines).items()
        for f in sc.summary["per_fold"]
        if f["collapsed"]
    ]
    if shipped and shipped.get("collapsed"):
        warnings.insert(0, f"SHIPPED MODEL: {shipped['collapsed']}")
    attempts = final.get("attempts") or []
    failed = [a for a in attempts if a.get("collapsed")]
    if failed and len(failed) == len(attempts):
        warnings.insert(
            0,
            f"SHIPPED MODEL: every one of {len(attempts)} final fits collapsed "
            f"({failed[-1]['collapsed']}); do not ship it",
        )
    elif failed:
        warnings.append(
            "final model: "
            + "; ".join(f"seed {a['seed']} collapsed ({a['collapsed']})" for a in failed)
            + f"; retrained with seed {attempts[-1]['seed']}"
        )
    warnings += [
        f"{k}: fold {i} thresholds: {c.problem}"
        for k, (sc, _) in _models(network, baselines).items()
        for i, c in enumerate(sc.per_fold, start=1)
        if c.problem
    ]
    return {
        "schema": "omis.train-report/1",
        "name": opts.name,
        "version": opts.version,
        "task": p.task.name,
        "classes": list(p.task.classes),
        "preset": p.preset.name,
        "model": name,
        "input": inp.spec.representation,
        "folds": len(folds),
        "data": data_record(p, opts.data),
        "confusion_matrix": pooled["confusion_matrix"],
        "sensitivity": pooled["sensitivity"],
        "specificity": pooled["specificity"],
        "accuracy": pooled["accuracy"],
        "roc_auc": pooled["roc_auc"],
        "roc_auc_ci95": pooled["roc_auc_ci95"],
        "threshold_at_target_sensitivity": pooled["threshold_at_target_sensitivity"],
        **{k: pooled[k] for k in REFERRAL_KEYS},
        "calibration": pooled["calibration"],
        "thresholds": net.summary["thresholds"],
        "render": inp.render.model_dump(mode="json"),
        "render_coverage": coverage,
        "render_coverage_per_fold": coverage_folds,
        "discriminative_coverage": _discriminative(p, inp, fold_inputs, folds),
        "cnn": net.summary,
        "baselines": {
            k: ({"skipped": v} if isinstance(v, str) else v[0].summary)
            for k, v in baselines.items()
        },
        "comparison": comparison(p.labels, p.task.high_classes, network, baselines),
        "per_patient": patients if any(v is not None for v in patients.values()) else None,
        "training_history": [e["history"] for e in run.extra],
        "warnings": warnings,
        "final_model": final,
        "shipped_operating_point": shipped,
        "export": {"onnx_vs_torch_max_abs_diff": diff, "opset": 17, "exporter": "torchscript"},
        "world_size": world_size,
        "device": device,
        "clinical_warning": "numbers from synthetic data are not clinical performance",
    }


def _full(v: float) -> str:
    """Full precision: ``repr`` round-trips a float exactly."""
    return repr(float(v))


def predictions_csv(
    p: Prepared, folds: list[tuple[I64, I64]], network: Network, baselines: Baselines
) -> str:
    """The out-of-fold predictions table (see the module docstring)."""
    fold_of = np.zeros(p.labels.size, dtype=np.int64)
    for k, (_, te) in enumerate(folds, start=1):
        fold_of[te] = k
    high = p.task.high_classes
    models = _models(network, baselines)
    scores = {k: high_risk_probability(r.probs, high) for k, (_, r) in models.items()}
    net = models[network[0]][0]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(
        ["slide_id", "patient_id", "pap_group", "fold", "truth"]
        + [f"p_high_{k}" for k in models]
        + ["threshold", "decision", "abstained"]
        + [f"{col}_{k}" for k in models for col in ("threshold", "abstain_low", "abstain_high")]
    )
    ph = scores[network[0]]
    for i, s in enumerate(p.ds.slides):
        w.writerow(
            [s.slide_id, s.patient_id, s.pap_group, int(fold_of[i]), p.task.classes[p.labels[i]]]
            + [_full(scores[k][i]) for k in models]
            + [
                _full(net.slide_threshold[i]),
                "high" if ph[i] >= net.slide_threshold[i] else "low",
                str(bool(net.band_low[i] <= ph[i] <= net.band_high[i])).lower(),
            ]
            + [
                _full(v)
                for sc, _ in models.values()
                for v in (sc.slide_threshold[i], sc.band_low[i], sc.band_high[i])
            ]
        )
    return buf.getvalue()


def write_outputs(
    work: Path,
    p: Prepared,
    opts: TrainOptions,
    *,
    cfg: FitConfig,
    folds: list[tuple[I64, I64]],
    report: dict[str, Any],
    network: Network,
    baselines: Baselines,
    inp: Inputs,
    environment: dict[str, Any],
) -> None:
    """config.json, report.json, report.md, predictions.csv and the plots."""
    slide_ids = [s.slide_id for s in p.ds.slides]
    config = {
        "options": opts.model_dump(mode="json"),
        "preset": p.preset.to_json(),
        "fit": cfg.model_dump(mode="json"),
        "spectrum": p.ds.params.model_dump(),
        "render": inp.render.model_dump(mode="json"),
        "input": inp.spec.model_dump(mode="json"),
        "folds": [
            {"train": [slide_ids[i] for i in tr], "test": [slide_ids[i] for i in te]}
            for tr, te in folds
        ],
        "torch": torch.__version__,
        "torch_threads": environment["torch_threads"],
        "cache": {k: p.ds.stats.to_json()[k] for k in RUN_ONLY},
        "environment": environment,
        "code_revision": code_revision(),
        # the data read, and the archive export they came from (its sha256 must equal ours)
        "data": {
            "manifest_sha256": p.ds.manifest_sha256,
            "files_sha256": p.ds.files_sha256,
            "export": report["data"].get("export"),
        },
    }
    write_json(work / "config.json", config)
    write_json(work / "report.json", report)
    atomic_write_text(work / "report.md", markdown(report))
    atomic_write_text(work / "predictions.csv", predictions_csv(p, folds, network, baselines))
    plots = work / "plots"
    probs = {k: r.probs for k, (_, r) in _models(network, baselines).items()}
    plot_confusions(plots / "confusion.png", report)
    plot_roc(plots / "roc.png", p.labels, probs, p.task.high_classes)
    plot_reliability(plots / "reliability.png", report)
    plot_losses(plots / "loss.png", report["training_history"])
    if p.spectra is not None:
        plot_mean_spectra(plots / "mean_spectra.png", p.spectra, p.labels, p.task.classes)
