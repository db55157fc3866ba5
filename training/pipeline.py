"""``omis train`` as short steps: prepare data, cross-validate, baselines, final model, bundle.

Final model: by default a network trained on all slides for the median of the folds'
early-stopping epochs (``final="all"``): every slide contributes and the epoch count was chosen
on held-out patients.  ``final="best-fold"`` ships instead the fold model with the lowest
validation loss (trained on (K-1)/K of the data).  The cross-validated metrics describe the
procedure either way; the bundle records them.

The output directory is built under a temporary name and renamed into place at the end, so an
interrupted run leaves no half-written output.  Under torchrun only rank 0 writes.
"""

from __future__ import annotations

import json
import logging
import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import torch
from pydantic import BaseModel, ConfigDict, Field

from firmware_bridge.fsutil import atomic_directory, atomic_write_text
from firmware_bridge.limits import MAX_EPOCHS, MAX_FOLDS
from inference.bundle import InputSpec, Thresholds, Training
from inference.exceptions import InferenceError
from inference.render import RenderParams, fit_x_range, fit_y_range
from inference.spectrum import parse_params
from training.baselines import cross_val_baselines, feature_matrix
from training.checkpoint import FORMAT
from training.data import Dataset, Task, get_task, load_dataset
from training.evaluate import (
    FoldPredictions,
    make_folds,
    network_inputs,
    spectra_images,
    summarize,
    validation_split,
)
from training.exceptions import ConfigError, DataError
from training.export import BundleMeta, code_revision, write_bundle
from training.model import Preset, build_model, get_preset, load_pretrained
from training.progress import Progress, Tick
from training.report import (
    markdown,
    plot_confusions,
    plot_mean_spectra,
    plot_roc,
    write_json,
)
from training.train import (
    Augment,
    DistInfo,
    FitConfig,
    ProgressFn,
    SpectrumImages,
    distributed,
    fit,
    predict_proba,
    resolve_device,
    save_checkpoint,
    seed_everything,
)

log = logging.getLogger(__name__)

F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]
CHECKPOINT_FORMAT = FORMAT
GOLDEN_COUNT = 4


class TrainOptions(BaseModel):
    """Everything ``omis train`` accepts; ``None`` takes the preset's value."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, frozen=True)

    data: Path = Field(description="dataset directory with manifest.csv")
    out: Path = Field(description="output directory (must not exist, or be empty)")
    task: Literal["binary", "pap4"] = "binary"
    preset: Literal["paper", "tiny"] = "tiny"
    folds: int = Field(5, ge=2, le=MAX_FOLDS)
    epochs: int | None = Field(None, ge=1, le=MAX_EPOCHS)
    batch_size: int | None = Field(None, ge=2)
    lr: float | None = Field(None, gt=0.0)
    device: Literal["cpu", "cuda"] = "cpu"
    pretrained: Path | None = None
    freeze_features: bool = False
    seed: int = Field(0, ge=0)
    name: str = Field("omis-vgg16", pattern=r"^[A-Za-z0-9._-]+$")
    version: int = Field(1, ge=1)
    max_slides: int | None = Field(None, ge=1)
    final: Literal["all", "best-fold"] = "all"
    target_sensitivity: float = Field(0.9, gt=0.0, le=1.0)
    spectrum_params: dict[str, Any] | None = None
    cache_dir: Path | None = Field(None, description="default: DATA/.omis-cache")
    no_cache: bool = False
    augment: Augment = Augment()
    thresholds: Thresholds = Thresholds()


@dataclass
class Prepared:
    """Data turned into network inputs, with everything the bundle must record."""

    ds: Dataset
    task: Task
    preset: Preset
    labels: I64
    inputs: F32
    render: RenderParams
    spec: InputSpec
    spectra: list[tuple[F64, F64]] | None


@dataclass
class TrainResult:
    """Where the outputs are, and the pooled cross-validated metrics."""

    out: Path
    bundle: Path
    report: dict[str, Any]
    seconds: float


def fit_config(opts: TrainOptions, preset: Preset) -> FitConfig:
    """Preset defaults overridden by the options."""
    return FitConfig(
        epochs=opts.epochs or preset.epochs,
        batch_size=opts.batch_size or preset.batch_size,
        lr=opts.lr or preset.lr,
        patience=preset.patience,
        seed=opts.seed,
        device=opts.device,
        freeze_features=opts.freeze_features,
        augment=opts.augment,
    )


def _check_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"--out {out} exists and is not an empty directory")


@contextmanager
def _output_dir(out: Path, info: DistInfo) -> Iterator[Path | None]:
    if not info.is_main:
        yield None
        return
    if out.is_dir():
        out.rmdir()  # checked empty before any work began
    with atomic_directory(out) as tmp:
        yield tmp


def prepare(opts: TrainOptions, progress: Progress) -> Prepared:
    """Load the dataset, fit the render y-range, render and preprocess every slide."""
    preset = get_preset(opts.preset)
    task = get_task(opts.task)
    try:
        params = parse_params(opts.spectrum_params)
    except InferenceError as exc:
        raise ConfigError(str(exc)) from exc
    cache = None if opts.no_cache else (opts.cache_dir or opts.data / ".omis-cache")
    with progress.task("spectra") as tick:
        ds = load_dataset(
            opts.data, params, cache_dir=cache, max_slides=opts.max_slides, progress=tick
        )
    labels = task.labels(ds.groups)
    present = sorted({task.classes[i] for i in labels})
    if len(present) < 2:
        raise DataError(f"the data hold only class(es) {present}; need at least two")
    spectra = [(s.x_nm, s.y) for s in ds.slides if s.x_nm is not None and s.y is not None]
    h, w = preset.input_size
    # The axis ranges are fitted once on all spectra (unsupervised, labels unused) and shipped
    # in the bundle: the spectra occupy a small part of the ±D axis, so drawing all of it
    # would leave the peaks a few pixels wide.
    if spectra:
        y_range = fit_y_range(np.concatenate([y for _, y in spectra]))
        x_range: tuple[float, float] | None = fit_x_range(
            spectra[0][0], np.stack([y for _, y in spectra])
        )
    else:
        y_range, x_range = (-2.0, 2.0), None
    render = RenderParams(width=w, height=h, y_range=y_range, x_range_nm=x_range)
    if ds.kind == "images":
        log.warning(
            "image dataset: the device renders with this bundle's render parameters; "
            "the given images must have been drawn with the same ones"
        )
    spec = InputSpec(shape=(-1, 3, h, w))
    inputs = network_inputs(spectra_images(ds.slides, render), spec)
    return Prepared(
        ds, task, preset, labels, inputs, render, spec, spectra if ds.has_spectra else None
    )


def _new_model(p: Prepared, opts: TrainOptions) -> torch.nn.Module:
    model = build_model(p.preset, len(p.task.classes))
    if opts.pretrained is not None:
        load_pretrained(model, opts.pretrained)
    return model


def _dataset(p: Prepared, idx: I64, cfg: FitConfig) -> SpectrumImages:
    spectra = [p.spectra[i] for i in idx] if p.spectra is not None else None
    return SpectrumImages(
        p.inputs[idx],
        p.labels[idx],
        spectra=spectra,
        render=p.render,
        spec=p.spec,
        augment=cfg.augment,
        seed=cfg.seed,
    )


def _phase_tick(tick: Tick) -> ProgressFn:
    def fn(_phase: str, done: int, total: int) -> None:
        tick(done, total)

    return fn


def cross_validate(
    p: Prepared,
    opts: TrainOptions,
    cfg: FitConfig,
    folds: list[tuple[I64, I64]],
    *,
    work: Path | None,
    extra: dict[str, Any],
    progress: Progress,
) -> tuple[FoldPredictions, list[dict[str, torch.Tensor]]]:
    """Train one network per fold; out-of-fold probabilities and each fold's best weights."""
    probs = np.zeros((p.labels.size, len(p.task.classes)), dtype=np.float64)
    preds = FoldPredictions(probs, folds)
    states = []
    for k, (train_idx, test_idx) in enumerate(folds, start=1):
        fit_idx, val_idx = validation_split(train_idx, p.labels, p.ds.patients, opts.seed + k)
        seed_everything(opts.seed + k)
        model = _new_model(p, opts)
        ckpt = work / "checkpoints" / f"fold-{k}.pt" if work is not None else None
        with progress.task(f"fold {k}/{len(folds)}") as tick:
            res = fit(
                model,
                _dataset(p, fit_idx, cfg),
                p.inputs[val_idx],
                p.labels[val_idx],
                cfg=cfg,
                num_classes=len(p.task.classes),
                checkpoint=ckpt,
                checkpoint_extra=extra,
                progress=_phase_tick(tick),
            )
        model.load_state_dict(res.state)
        device = resolve_device(cfg.device)
        probs[test_idx] = predict_proba(model, p.inputs[test_idx], cfg.batch_size, device)
        states.append(res.state)
        preds.extra.append(
            {
                "best_epoch": res.best_epoch,
                "epochs_run": res.epochs_run,
                "best_val_loss": res.best_val_loss,
                "n_fit": int(fit_idx.size),
                "n_val": int(val_idx.size),
                "n_test": int(test_idx.size),
            }
        )
        log.info(
            "fold %d/%d: best epoch %d of %d, val loss %s",
            k,
            len(folds),
            res.best_epoch,
            res.epochs_run,
            res.best_val_loss,
        )
    return preds, states


def final_model(
    p: Prepared,
    opts: TrainOptions,
    cfg: FitConfig,
    preds: FoldPredictions,
    *,
    states: list[dict[str, torch.Tensor]],
    work: Path | None,
    extra: dict[str, Any],
    progress: Progress,
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The shipped network (see the module docstring for the choice)."""
    model = _new_model(p, opts)
    if opts.final == "best-fold":
        losses = [e["best_val_loss"] for e in preds.extra]
        best = min(range(len(states)), key=lambda i: (losses[i] is None, losses[i] or 0.0))
        model.load_state_dict(states[best])
        return model, {
            "choice": "best-fold",
            "fold": best + 1,
            "description": f"the fold-{best + 1} model (lowest validation loss)",
        }
    epochs = max(1, round(statistics.median(e["best_epoch"] for e in preds.extra)))
    seed_everything(opts.seed)
    all_idx = np.arange(p.labels.size, dtype=np.int64)
    ckpt = work / "checkpoints" / "final.pt" if work is not None else None
    with progress.task("final model") as tick:
        res = fit(
            model,
            _dataset(p, all_idx, cfg),
            None,
            None,
            cfg=cfg.model_copy(update={"epochs": epochs}),
            num_classes=len(p.task.classes),
            checkpoint=ckpt,
            checkpoint_extra=extra,
            progress=_phase_tick(tick),
        )
    model.load_state_dict(res.state)
    return model, {
        "choice": "all",
        "epochs": epochs,
        "description": f"trained on all {p.labels.size} slides for {epochs} epoch(s), "
        "the median of the folds' early-stopping epochs",
    }


def golden_indices(labels: I64, count: int = GOLDEN_COUNT) -> list[int]:
    """A few slides for the golden inputs: the first of each class, then the next ones."""
    chosen = [int(np.flatnonzero(labels == c)[0]) for c in np.unique(labels)]
    rest = [i for i in range(labels.size) if i not in chosen]
    return sorted((chosen + rest)[: max(count, 1)])


def _bundle_meta(p: Prepared, opts: TrainOptions, metrics: dict[str, Any]) -> BundleMeta:
    return BundleMeta(
        name=opts.name,
        version=opts.version,
        task=p.task.name,
        classes=p.task.classes,
        risk=dict(p.task.risk),
        input=p.spec,
        spectrum=p.ds.params.model_dump(),
        render=p.render.model_dump(),
        thresholds=opts.thresholds,
        training=Training(
            code_revision=code_revision(),
            data_manifest_sha256=p.ds.manifest_sha256,
            metrics=metrics,
            preset=p.preset.name,
        ),
    )


def meta_to_json(meta: BundleMeta) -> dict[str, Any]:
    """A checkpoint-safe (plain JSON) form of the bundle metadata."""
    return {
        "name": meta.name,
        "version": meta.version,
        "task": meta.task,
        "classes": list(meta.classes),
        "risk": meta.risk,
        "input": meta.input.model_dump(mode="json"),
        "spectrum": meta.spectrum,
        "render": json.loads(json.dumps(meta.render, allow_nan=False)),
        "thresholds": meta.thresholds.model_dump(mode="json"),
        "training": meta.training.model_dump(mode="json"),
        "min_app_version": meta.min_app_version,
    }


def _metrics_summary(pooled: dict[str, Any], folds: int) -> dict[str, Any]:
    keys = ("sensitivity", "specificity", "accuracy")
    out: dict[str, Any] = {
        k: {"value": pooled[k]["value"], "ci95": pooled[k]["ci95"]} for k in keys
    }
    out.update(
        roc_auc=pooled["roc_auc"],
        n=pooled["n"],
        folds=folds,
        evaluation="stratified patient-grouped cross-validation, pooled out-of-fold",
    )
    return out


def run_training(opts: TrainOptions, progress: Progress | None = None) -> TrainResult:
    """``omis train``: everything, ending with a verified bundle and the report."""
    started = time.monotonic()
    _check_out(opts.out)
    resolve_device(opts.device)  # before any work: no GPU is an error, never a fallback
    progress = progress or Progress(enabled=False)
    cfg = fit_config(opts, get_preset(opts.preset))
    with distributed(opts.device) as info, progress:
        p = prepare(opts, progress)
        folds = make_folds(p.labels, p.ds.patients, opts.folds, opts.seed)
        with _output_dir(opts.out, info) as work:
            report = _train_and_report(p, opts, cfg, folds, work=work, info=info, progress=progress)
    seconds = time.monotonic() - started
    log.info("omis train finished in %.1f s: %s", seconds, opts.out)
    return TrainResult(opts.out, opts.out / "bundle", report, seconds)


def _train_and_report(
    p: Prepared,
    opts: TrainOptions,
    cfg: FitConfig,
    folds: list[tuple[I64, I64]],
    *,
    work: Path | None,
    info: DistInfo,
    progress: Progress,
) -> dict[str, Any]:
    golden_idx = golden_indices(p.labels)
    meta = _bundle_meta(p, opts, {})
    extra = {
        "format": CHECKPOINT_FORMAT,
        "preset": p.preset.to_json(),
        "num_classes": len(p.task.classes),
        "bundle_meta": meta_to_json(meta),
        "golden_inputs": torch.from_numpy(p.inputs[golden_idx].copy()),
    }
    preds, states = cross_validate(p, opts, cfg, folds, work=work, extra=extra, progress=progress)
    high = p.task.high_classes
    cnn = summarize(p.labels, preds, high, opts.thresholds.decision, opts.target_sensitivity)
    model, final = final_model(
        p, opts, cfg, preds, states=states, work=work, extra=extra, progress=progress
    )
    if work is None:
        return {"cnn": cnn}
    baselines, baseline_probs = _baselines(p, opts, folds)
    meta = _bundle_meta(p, opts, _metrics_summary(cnn["pooled"], len(folds)))
    extra["bundle_meta"] = meta_to_json(meta)
    save_checkpoint(
        work / "checkpoints" / "final.pt",
        {**extra, "model_state": model.state_dict(), "final": final},
    )
    _, diff = write_bundle(work / "bundle", model, p.inputs[golden_idx], meta)
    report = _report(
        p, opts, cfg, folds, cnn=cnn, baselines=baselines, final=final, diff=diff, info=info
    )
    _write_outputs(
        work,
        p,
        opts,
        cfg=cfg,
        folds=folds,
        report=report,
        probs={"vgg16": preds.probs, **baseline_probs},
    )
    return report


def _baselines(
    p: Prepared, opts: TrainOptions, folds: list[tuple[I64, I64]]
) -> tuple[dict[str, Any], dict[str, F64]]:
    if p.spectra is None:
        reason = "image dataset: no spectra for peak features"
        return {"naive_bayes": {"skipped": reason}, "random_forest": {"skipped": reason}}, {}
    feats = feature_matrix(p.spectra)
    probs = cross_val_baselines(feats, p.labels, folds, len(p.task.classes), opts.seed)
    res = {
        name: summarize(
            p.labels,
            FoldPredictions(pr, folds),
            p.task.high_classes,
            opts.thresholds.decision,
            opts.target_sensitivity,
        )
        for name, pr in probs.items()
    }
    return res, probs


def _report(
    p: Prepared,
    opts: TrainOptions,
    cfg: FitConfig,
    folds: list[tuple[I64, I64]],
    *,
    cnn: dict[str, Any],
    baselines: dict[str, Any],
    final: dict[str, Any],
    diff: float,
    info: DistInfo,
) -> dict[str, Any]:
    return {
        "schema": "omis.train-report/1",
        "name": opts.name,
        "version": opts.version,
        "task": p.task.name,
        "classes": list(p.task.classes),
        "preset": p.preset.name,
        "folds": len(folds),
        "data": {
            "dir": str(opts.data),
            "kind": p.ds.kind,
            "slides_used": len(p.ds.slides),
            "patients": len(set(p.ds.patients)),
            "manifest_sha256": p.ds.manifest_sha256,
            **p.ds.stats.to_json(),
        },
        "confusion_matrix": cnn["pooled"]["confusion_matrix"],
        "sensitivity": cnn["pooled"]["sensitivity"],
        "specificity": cnn["pooled"]["specificity"],
        "accuracy": cnn["pooled"]["accuracy"],
        "roc_auc": cnn["pooled"]["roc_auc"],
        "threshold_at_target_sensitivity": cnn["pooled"]["threshold_at_target_sensitivity"],
        "calibration": cnn["pooled"]["calibration"],
        "cnn": cnn,
        "baselines": baselines,
        "final_model": final,
        "export": {"onnx_vs_torch_max_abs_diff": diff, "opset": 17, "exporter": "torchscript"},
        "world_size": info.world_size,
        "device": cfg.device,
        "clinical_warning": "numbers from synthetic data are not clinical performance",
    }


def _write_outputs(
    work: Path,
    p: Prepared,
    opts: TrainOptions,
    *,
    cfg: FitConfig,
    folds: list[tuple[I64, I64]],
    report: dict[str, Any],
    probs: dict[str, F64],
) -> None:
    slide_ids = [s.slide_id for s in p.ds.slides]
    config = {
        "options": opts.model_dump(mode="json"),
        "preset": p.preset.to_json(),
        "fit": cfg.model_dump(mode="json"),
        "spectrum": p.ds.params.model_dump(),
        "render": p.render.model_dump(mode="json"),
        "input": p.spec.model_dump(mode="json"),
        "folds": [
            {"train": [slide_ids[i] for i in tr], "test": [slide_ids[i] for i in te]}
            for tr, te in folds
        ],
        "torch": torch.__version__,
        "code_revision": code_revision(),
    }
    write_json(work / "config.json", config)
    write_json(work / "report.json", report)
    atomic_write_text(work / "report.md", markdown(report))
    plots = work / "plots"
    plot_confusions(plots / "confusion.png", report)
    plot_roc(plots / "roc.png", p.labels, probs, p.task.high_classes)
    if p.spectra is not None:
        plot_mean_spectra(plots / "mean_spectra.png", p.spectra, p.labels, p.task.classes)
