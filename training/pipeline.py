"""``omis train`` as short steps: prepare data, cross-validate, baselines, final model, bundle.

Final model: by default a network trained on all slides for the median of the folds'
early-stopping epochs (``final="all"``): every slide contributes and the epoch count was chosen
on held-out patients.  ``final="best-fold"`` ships instead the fold model with the lowest
validation loss (trained on (K-1)/K of the data).  The cross-validated metrics describe the
procedure either way; the bundle records them.  The shipped thresholds (and temperature) are
chosen on the folds' pooled validation predictions (:mod:`training.crossval`).

The output directory is built under a temporary name and renamed into place at the end, so an
interrupted run leaves no half-written output.  Under torchrun only rank 0 writes.
"""

from __future__ import annotations

import dataclasses
import logging
import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from firmware_bridge.fsutil import atomic_directory
from inference.bundle import Thresholds
from inference.exceptions import InferenceError
from inference.spectrum import axis_nm, parse_params
from training.baselines import cross_val_baselines, feature_matrix
from training.checkpoint import FORMAT
from training.crossval import (
    ModelRun,
    Scored,
    checkpoint_path,
    cross_validate_network,
    pooled_temperature,
    score_model,
)
from training.data import get_task, load_dataset
from training.evaluate import validation_split
from training.exceptions import ConfigError, DataError
from training.export import write_bundle
from training.metrics import high_risk_probability
from training.model import VGG16Classifier, build_model, get_preset, load_pretrained
from training.options import (
    TrainOptions,
    check_weights_decision,
    fit_config,
    given_render,
    pretrained_record,
)
from training.outputs import build_report, write_outputs
from training.prepared import Prepared
from training.progress import Progress, Tick
from training.record import bundle_meta, checkpoint_extra, metrics_summary
from training.study import by_study, export_record, reference_distribution, study_folds
from training.thresholds import softmax_t
from training.train import (
    DistInfo,
    FitConfig,
    FitResult,
    ProgressFn,
    SpectrumImages,
    distributed,
    fit,
    resolve_device,
    save_checkpoint,
    seed_everything,
)
from training.window import Inputs

log = logging.getLogger(__name__)

F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]
CHECKPOINT_FORMAT = FORMAT
GOLDEN_COUNT = 4
NETWORK_NAMES = {"paper": "vgg16", "tiny": "vgg16", "spectrum1d": "spectrum1d"}


@dataclass
class TrainResult:
    """Where the outputs are, and the pooled cross-validated metrics."""

    out: Path
    bundle: Path
    report: dict[str, Any]
    seconds: float


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
    """Load the dataset, keep the task's slides, stack the spectra on the algorithm's axis."""
    preset = get_preset(opts.preset)
    task = get_task(opts.task)
    try:
        params = parse_params(opts.spectrum_params)
    except InferenceError as exc:
        raise ConfigError(str(exc)) from exc
    cache = None if opts.no_cache else (opts.cache_dir or opts.data / ".omis-cache")
    with progress.task("spectra") as tick:
        ds = load_dataset(
            opts.data,
            params,
            cache_dir=cache,
            max_slides=opts.max_slides,
            progress=tick,
            allow_lossy=opts.allow_lossy,
        )
    kept = tuple(s for s in ds.slides if s.pap_group in task.group_to_class)
    outside = len(ds.slides) - len(kept)
    if outside:
        log.info("task %s: %d slide(s) of other Pap groups left out", task.name, outside)
        ds = dataclasses.replace(ds, slides=kept)
    labels = task.labels(ds.groups)
    present = sorted({task.classes[i] for i in labels})
    if len(present) < 2:
        raise DataError(f"the data hold only class(es) {present}; need at least two")
    if ds.kind == "images":
        if preset.representation != "image":
            raise ConfigError(f"preset {preset.name} reads spectra; this is an image dataset")
        return Prepared(ds, task, preset, labels, None, None, given_render(opts, preset), outside)
    axis = axis_nm(params)
    ys = np.stack([np.asarray(s.y, dtype=np.float64) for s in ds.slides])
    if preset.representation == "spectrum":
        preset = dataclasses.replace(preset, input_size=(1, int(axis.size)))
    return Prepared(ds, task, preset, labels, axis, ys, None, outside)


def _new_model(p: Prepared, opts: TrainOptions) -> torch.nn.Module:
    model = build_model(p.preset, len(p.task.classes))
    if opts.pretrained is not None:
        if not isinstance(model, VGG16Classifier):
            raise ConfigError(f"--pretrained does not fit the {p.preset.name} preset")
        load_pretrained(model, opts.pretrained)
    return model


def _dataset(p: Prepared, inp: Inputs, idx: I64, cfg: FitConfig) -> SpectrumImages:
    spectra = p.spectra
    return SpectrumImages(
        inp.inputs[idx],
        p.labels[idx],
        spectra=[spectra[i] for i in idx] if spectra is not None else None,
        render=inp.render,
        spec=inp.spec,
        augment=cfg.augment,
        seed=cfg.seed,
    )


def _phase_tick(tick: Tick) -> ProgressFn:
    def fn(_phase: str, done: int, total: int) -> None:
        tick(done, total)

    return fn


@dataclass
class _Context:
    p: Prepared
    opts: TrainOptions
    cfg: FitConfig
    work: Path | None
    extra: dict[str, Any]
    progress: Progress


def _fold_fitter(ctx: _Context, n_folds: int) -> Any:
    def fit_fold(k: int, fit_idx: I64, val_idx: I64, inp: Inputs) -> FitResult:
        seed_everything(ctx.opts.seed + k)
        model = _new_model(ctx.p, ctx.opts)
        with ctx.progress.task(f"fold {k}/{n_folds}") as tick:
            return fit(
                model,
                _dataset(ctx.p, inp, fit_idx, ctx.cfg),
                inp.inputs[val_idx],
                ctx.p.labels[val_idx],
                cfg=ctx.cfg,
                num_classes=len(ctx.p.task.classes),
                checkpoint=checkpoint_path(ctx.work, f"fold-{k}.pt"),
                checkpoint_extra=ctx.extra,
                progress=_phase_tick(tick),
            )

    return fit_fold


def _loaded(ctx: _Context) -> Any:
    def model_for(res: FitResult) -> torch.nn.Module:
        model = build_model(ctx.p.preset, len(ctx.p.task.classes))
        model.load_state_dict(res.state)
        return model.to(resolve_device(ctx.cfg.device))

    return model_for


def final_model(
    ctx: _Context, run: ModelRun, results: list[FitResult], fold_inputs: list[Inputs]
) -> tuple[torch.nn.Module, Inputs, dict[str, Any]]:
    """The shipped network and the inputs it reads (see the module docstring for the choice)."""
    p, opts = ctx.p, ctx.opts
    model = _new_model(p, opts)
    if opts.final == "best-fold":
        losses = [r.best_val_loss for r in results]
        best = min(range(len(results)), key=lambda i: (losses[i] is None, losses[i] or 0.0))
        model.load_state_dict(results[best].state)
        return (
            model,
            fold_inputs[best],
            {
                "choice": "best-fold",
                "fold": best + 1,
                "description": f"the fold-{best + 1} model (lowest validation loss)",
            },
        )
    epochs = max(1, round(statistics.median(e["best_epoch"] for e in run.extra)))
    all_idx = np.arange(p.labels.size, dtype=np.int64)
    inp = p.inputs_for(all_idx)
    seed_everything(opts.seed)
    with ctx.progress.task("final model") as tick:
        res = fit(
            model,
            _dataset(p, inp, all_idx, ctx.cfg),
            None,
            None,
            cfg=ctx.cfg.model_copy(update={"epochs": epochs}),
            num_classes=len(p.task.classes),
            checkpoint=checkpoint_path(ctx.work, "final.pt"),
            checkpoint_extra=ctx.extra,
            progress=_phase_tick(tick),
        )
    model.load_state_dict(res.state)
    return (
        model,
        inp,
        {
            "choice": "all",
            "epochs": epochs,
            "description": f"trained on all {p.labels.size} slides for {epochs} epoch(s), "
            "the median of the folds' early-stopping epochs",
        },
    )


def golden_indices(labels: I64, count: int = GOLDEN_COUNT) -> list[int]:
    """A few slides for the golden inputs: the first of each class, then the next ones."""
    chosen = [int(np.flatnonzero(labels == c)[0]) for c in np.unique(labels)]
    rest = [i for i in range(labels.size) if i not in chosen]
    return sorted((chosen + rest)[: max(count, 1)])


def run_training(opts: TrainOptions, progress: Progress | None = None) -> TrainResult:
    """``omis train``: everything, ending with a verified bundle and the report."""
    started = time.monotonic()
    check_weights_decision(opts)
    pretrained_record(opts)  # a missing weights file is an error before any work
    _check_out(opts.out)
    resolve_device(opts.device)  # before any work: no GPU is an error, never a fallback
    progress = progress or Progress(enabled=False)
    cfg = fit_config(opts, get_preset(opts.preset))
    with distributed(opts.device) as info, progress:
        p = prepare(opts, progress)
        folds = study_folds(p.labels, p.ds.slides, opts.group_by, opts.folds, opts.seed)
        with _output_dir(opts.out, info) as work:
            ctx = _Context(p, opts, cfg, work, {}, progress)
            report = _train_and_report(ctx, folds, info=info)
    seconds = time.monotonic() - started
    log.info("omis train finished in %.1f s: %s", seconds, opts.out)
    return TrainResult(opts.out, opts.out / "bundle", report, seconds)


def _train_and_report(
    ctx: _Context, folds: list[tuple[I64, I64]], *, info: DistInfo
) -> dict[str, Any]:
    p, opts, cfg = ctx.p, ctx.opts, ctx.cfg
    golden_idx = golden_indices(p.labels)
    inner = [
        validation_split(tr, p.labels, p.ds.patients, opts.seed + k)
        for k, (tr, _) in enumerate(folds, start=1)
    ]
    all_inp = p.inputs_for(np.arange(p.labels.size, dtype=np.int64))
    meta = bundle_meta(p, opts, all_inp, Thresholds(), {})
    ctx.extra.update(checkpoint_extra(p, meta, all_inp.inputs[golden_idx]))
    run, results, fold_inputs = cross_validate_network(
        p.inputs_for,
        _fold_fitter(ctx, len(folds)),
        _loaded(ctx),
        labels=p.labels,
        folds=folds,
        inner=inner,
        cfg=cfg,
        num_classes=len(p.task.classes),
        temperature_scaling=opts.temperature_scaling,
    )
    high = p.task.high_classes
    temperature = pooled_temperature(run, p.labels, inner) if opts.temperature_scaling else 1.0
    shipped_val = None
    if opts.temperature_scaling:
        shipped_val = softmax_t(np.concatenate(run.val_logits), temperature)
    net = score_model(
        run,
        p.labels,
        folds,
        inner,
        high=high,
        target=opts.target_sensitivity,
        temperature=temperature,
        shipped_val=shipped_val,
        classes=p.task.classes,
    )
    model, inp, final = final_model(ctx, run, results, fold_inputs)
    if ctx.work is None:
        return {"cnn": net.summary}
    baselines = _baselines(p, opts, folds, inner)
    summary = metrics_summary(net.summary["pooled"], len(folds))
    p_high = high_risk_probability(run.probs, high)
    summary["reference_distribution"] = reference_distribution(
        p.ds, p_high, net.shipped.thresholds, summary
    )
    meta = bundle_meta(p, opts, inp, net.shipped.thresholds, summary)
    ctx.extra.update(checkpoint_extra(p, meta, inp.inputs[golden_idx]))
    save_checkpoint(
        ctx.work / "checkpoints" / "final.pt",
        {**ctx.extra, "model_state": model.state_dict(), "final": final},
    )
    _, diff = write_bundle(ctx.work / "bundle", model, inp.inputs[golden_idx], meta)
    name = NETWORK_NAMES[p.preset.name]
    report = build_report(
        p,
        opts,
        folds,
        network=(name, net, run),
        baselines=baselines,
        final=final,
        inputs=(inp, fold_inputs),
        diff=diff,
        world_size=info.world_size,
        device=cfg.device,
    )
    positive = np.isin(p.labels, list(high))
    report["by_study"] = by_study(p.ds.slides, positive, p_high >= net.slide_threshold)
    report["dataset_export"] = export_record(p.ds)  # "export" is the ONNX export check
    write_outputs(
        ctx.work,
        p,
        opts,
        cfg=cfg,
        folds=folds,
        report=report,
        network=(name, net, run),
        baselines=baselines,
        inp=inp,
    )
    return report


def _baselines(
    p: Prepared, opts: TrainOptions, folds: list[tuple[I64, I64]], inner: list[tuple[I64, I64]]
) -> dict[str, tuple[Scored, ModelRun] | str]:
    spectra = p.spectra
    if spectra is None or p.ys is None:
        reason = "image dataset: no spectra for the classical baselines"
        return {"naive_bayes": reason, "random_forest": reason, "logistic_regression": reason}
    feats = {"peaks": feature_matrix(spectra), "spectrum": p.ys}
    runs = cross_val_baselines(feats, p.labels, folds, len(p.task.classes), opts.seed, inner=inner)
    out: dict[str, tuple[Scored, ModelRun] | str] = {}
    for name, (probs, val) in runs.items():
        run = ModelRun(probs, val)
        scored = score_model(
            run,
            p.labels,
            folds,
            inner,
            high=p.task.high_classes,
            target=opts.target_sensitivity,
            classes=p.task.classes,
        )
        out[name] = (scored, run)
    return out
