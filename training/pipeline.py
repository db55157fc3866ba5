"""``omis train`` as short steps: prepare data, cross-validate, baselines, final model, bundle.

Final model: by default (``final="all"``) a network trained like a fold model on about four
fifths of the patients (early stopping on an inner validation split of them), the rest kept as
its calibration split, on which its temperature and thresholds are chosen and its operating
point measured (:mod:`training.operating`).  ``final="best-fold"`` ships instead the fold model
with the lowest validation loss, with its fold's thresholds.  The cross-validated metrics
describe the procedure either way; the bundle records them.

The output directory is built under a temporary name and renamed into place at the end, so an
interrupted run leaves no half-written output.  Under torchrun only rank 0 writes.
"""

from __future__ import annotations

import dataclasses
import logging
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
from inference.bundle import OperatingPoint, Thresholds
from inference.exceptions import InferenceError
from inference.spectrum import axis_nm, parse_params
from training.baselines import BASELINES, cross_val_baselines, feature_matrix
from training.checkpoint import FORMAT
from training.compare import collapse_reason
from training.crossval import (
    ModelRun,
    Scored,
    checkpoint_path,
    cross_validate_network,
    score_model,
)
from training.data import get_task, load_dataset
from training.environment import environment_record
from training.evaluate import validation_split
from training.exceptions import ConfigError, DataError
from training.export import write_bundle
from training.metrics import high_risk_probability
from training.model import VGG16Classifier, build_model, get_preset, load_pretrained
from training.operating import Reference, Target, calibrate, fold_levels, operating_point
from training.options import (
    TrainOptions,
    check_weights_decision,
    fit_config,
    given_render,
    pretrained_record,
)
from training.outputs import REFERRAL_KEYS, build_report, write_outputs
from training.prepared import Prepared
from training.progress import Progress, Tick
from training.record import bundle_meta, checkpoint_extra, metrics_summary
from training.study import by_study, export_record, reference_distribution, study_folds
from training.train import (
    DistInfo,
    FitConfig,
    FitResult,
    ProgressFn,
    SpectrumImages,
    distributed,
    fit,
    predict_logits,
    resolve_device,
    save_checkpoint,
    seed_everything,
    set_threads,
)
from training.window import Inputs

log = logging.getLogger(__name__)

F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]
CHECKPOINT_FORMAT = FORMAT
GOLDEN_COUNT = 4
CALIBRATION_SEED = 7919  # the final model's calibration split differs from every fold's
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
    environment: dict[str, Any]


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


@dataclass
class Final:
    """The shipped network, its inputs, thresholds and operating point."""

    model: torch.nn.Module
    inputs: Inputs
    info: dict[str, Any]
    thresholds: Thresholds
    operating_point: OperatingPoint
    report: dict[str, Any]


def _target(opts: TrainOptions) -> Target:
    return Target(
        opts.target_sensitivity,
        opts.max_referral,
        opts.temperature_scaling,
        opts.referral_confidence,
    )


def _best_fold(
    ctx: _Context, run: ModelRun, net: Scored, results: list[FitResult], fold_inputs: list[Inputs]
) -> Final:
    """The fold model with the lowest validation loss, with its fold's thresholds and figures."""
    p, opts = ctx.p, ctx.opts
    model = _new_model(p, opts)
    losses = [r.best_val_loss for r in results]
    best = min(range(len(results)), key=lambda i: (losses[i] is None, losses[i] or 0.0))
    model.load_state_dict(results[best].state)
    fold = net.summary["per_fold"][best]
    th = net.per_fold[best].thresholds.model_copy(
        update={"temperature": float(run.extra[best]["temperature"])}
    )
    # the rate the band is validated not to exceed: its bound from the fold's validation
    # slides, or what its test slides showed when that is higher
    bound = (net.per_fold[best].bound or {}).get("upper_bound")
    observed = fold["referral_rate"]["value"] or 0.0
    rate = max(observed, float(bound)) if isinstance(bound, float) else observed
    measured_on = (
        f"fold {best + 1}'s test slides (never seen by that fold's model): the band's referral "
        "bound from that fold's validation slides, or the test slides' rate if higher"
    )
    return Final(
        model,
        fold_inputs[best],
        {
            "choice": "best-fold",
            "fold": best + 1,
            "description": f"the fold-{best + 1} model (lowest validation loss)",
        },
        th,
        operating_point(rate, int(fold["n"]), p.ds.stats, measured_on),
        {
            "measured_on": measured_on,
            "slides": fold["n"],
            "thresholds": {**net.per_fold[best].to_json(), **th.model_dump(mode="json")},
            "figures": {
                k: fold[k] for k in (*REFERRAL_KEYS, "sensitivity", "specificity", "roc_auc")
            },
        },
    )


FINAL_ATTEMPTS = 3  # a final fit stuck at chance-level loss is retried with a new seed
FINAL_RETRY_SEED = 104729


def _fit_final(
    ctx: _Context, inp: Inputs, train_idx: I64, val_idx: I64
) -> tuple[torch.nn.Module, FitResult, list[dict[str, Any]]]:
    """Fit the final network; an attempt whose validation loss stays at chance level is retried.

    A tiny network on ~100 slides sometimes never leaves chance-level validation loss (the same
    rule flags collapsed folds).  Each attempt is recorded (``final_model.attempts``) and a
    retried fit is named in the report's warnings: nothing is switched silently.  When every
    attempt collapses the last one ships, with the collapse in the warnings.
    """
    p, opts = ctx.p, ctx.opts
    k = len(p.task.classes)
    attempts: list[dict[str, Any]] = []
    model, res = _new_model(p, opts), None
    for attempt in range(FINAL_ATTEMPTS):
        seed = opts.seed + attempt * FINAL_RETRY_SEED
        seed_everything(seed)
        model = _new_model(p, opts)
        name = "final model" if attempt == 0 else f"final model (attempt {attempt + 1})"
        with ctx.progress.task(name) as tick:
            res = fit(
                model,
                _dataset(p, inp, train_idx, ctx.cfg.model_copy(update={"seed": seed})),
                inp.inputs[val_idx] if val_idx.size else None,
                p.labels[val_idx] if val_idx.size else None,
                cfg=ctx.cfg.model_copy(update={"seed": seed}),
                num_classes=k,
                checkpoint=checkpoint_path(ctx.work, "final.pt"),
                checkpoint_extra=ctx.extra,
                progress=_phase_tick(tick),
            )
        why = collapse_reason(np.zeros(0, np.int64), np.zeros(0, np.int64), res.best_val_loss, k)
        attempts.append(
            {
                "seed": seed,
                "best_epoch": res.best_epoch,
                "epochs_run": res.epochs_run,
                "best_val_loss": res.best_val_loss,
                "collapsed": why,
            }
        )
        if why is None:
            break
        log.warning("final model attempt %d (seed %d) collapsed: %s", attempt + 1, seed, why)
    assert res is not None
    model.load_state_dict(res.state)
    return model, res, attempts


def _reference(p: Prepared, run: ModelRun, folds: list[tuple[I64, I64]], cal_idx: I64) -> Reference:
    """The network's out-of-fold percentile levels, the calibration split left out."""
    levels = fold_levels(high_risk_probability(run.probs, p.task.high_classes), folds)
    keep = np.ones(p.labels.size, dtype=bool)
    keep[cal_idx] = False
    keep &= ~np.isnan(levels)
    positive = np.isin(p.labels, list(p.task.high_classes))
    return Reference(positive[keep], levels[keep])


def final_model(
    ctx: _Context,
    run: ModelRun,
    net: Scored,
    results: list[FitResult],
    fold_inputs: list[Inputs],
    *,
    folds: list[tuple[I64, I64]],
) -> Final:
    """The shipped network, its thresholds and its operating point (:mod:`training.operating`)."""
    p, opts = ctx.p, ctx.opts
    if opts.final == "best-fold":
        return _best_fold(ctx, run, net, results, fold_inputs)
    all_idx = np.arange(p.labels.size, dtype=np.int64)
    fit_idx, cal_idx = validation_split(
        all_idx, p.labels, p.ds.patients, opts.seed + CALIBRATION_SEED
    )
    if cal_idx.size == 0:
        raise DataError(
            "too few patients (< 3) to hold out a calibration split for the final model"
        )
    # Trained exactly like a fold model: early stopping on an inner validation split of its own
    # training patients (a fixed epoch count and the last state could land on a bad step of a
    # noisy trajectory: one seed's final model gave every slide p(high) 0.496).
    train_idx, val_idx = validation_split(
        fit_idx, p.labels, p.ds.patients, opts.seed + 2 * CALIBRATION_SEED
    )
    inp = p.inputs_for(fit_idx)
    model, res, attempts = _fit_final(ctx, inp, train_idx, val_idx)
    epochs = res.best_epoch
    collapsed_attempts = [a for a in attempts if a["collapsed"]]
    device = resolve_device(ctx.cfg.device)
    z_cal = predict_logits(model.to(device), inp.inputs[cal_idx], ctx.cfg.batch_size, device)
    cal = calibrate(
        z_cal.double().numpy(),
        p.labels[cal_idx],
        [p.ds.patients[i] for i in cal_idx],
        high=p.task.high_classes,
        target=_target(opts),
        seed=opts.seed,
        reference=_reference(p, run, folds, cal_idx),
    )
    measured_on = (
        "held-out calibration split: upper bound of the shipped band's referral rate on new slides"
    )
    return Final(
        model.cpu(),
        inp,
        {
            "choice": "all",
            "epochs": epochs,
            "epochs_run": res.epochs_run,
            "best_val_loss": res.best_val_loss,
            "attempts": attempts,
            "collapsed_attempts": len(collapsed_attempts),
            "fit_slides": int(train_idx.size),
            "validation_slides": int(val_idx.size),
            "calibration_slides": int(cal_idx.size),
            "calibration_slide_ids": [p.ds.slides[i].slide_id for i in cal_idx],
            "description": f"trained on {train_idx.size} of {p.labels.size} slides, early "
            f"stopping on {val_idx.size} more (best epoch {epochs} of {res.epochs_run}), like "
            f"a fold model; temperature and thresholds chosen on the other {cal_idx.size} "
            "slides (held-out patients)",
        },
        cal.choice.thresholds,
        operating_point(cal.referral_rate, cal.slides, p.ds.stats, measured_on),
        cal.report,
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
    threads = set_threads(opts.threads)
    progress = progress or Progress(enabled=False)
    cfg = fit_config(opts, get_preset(opts.preset))
    with distributed(opts.device) as info, progress:
        p = prepare(opts, progress)
        folds = study_folds(p.labels, p.ds.slides, opts.group_by, opts.folds, opts.seed)
        with _output_dir(opts.out, info) as work:
            ctx = _Context(p, opts, cfg, work, {}, progress, environment_record(threads))
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
    net = score_model(
        run,
        p.labels,
        folds,
        inner,
        high=p.task.high_classes,
        target=opts.target_sensitivity,
        max_referral=opts.max_referral,
        referral_confidence=opts.referral_confidence,
        classes=p.task.classes,
    )
    shipped = final_model(ctx, run, net, results, fold_inputs, folds=folds)
    model, inp, final = shipped.model, shipped.inputs, shipped.info
    net.summary["thresholds"]["shipped"] = {
        "n_validation": shipped.report["slides"],
        "problem": None,
        **shipped.report["thresholds"],
        **shipped.thresholds.model_dump(mode="json"),
        "chosen_on_detail": shipped.report["measured_on"],
        "shipped_method": shipped.report.get("method"),
    }
    if ctx.work is None:
        return {"cnn": net.summary}
    _save_fold_checkpoints(
        ctx, run, net=net, results=results, fold_inputs=fold_inputs, golden_idx=golden_idx
    )
    baselines = _baselines(p, opts, folds, inner)
    summary = metrics_summary(net.summary["pooled"], len(folds))
    p_high = high_risk_probability(run.probs, p.task.high_classes)
    summary["reference_distribution"] = reference_distribution(
        p.ds, p_high, shipped.thresholds, summary, shipped.operating_point.referral_rate
    )
    meta = bundle_meta(
        p, opts, inp, shipped.thresholds, summary, operating_point=shipped.operating_point
    )
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
        shipped=shipped.report,
        world_size=info.world_size,
        device=cfg.device,
    )
    positive = np.isin(p.labels, list(p.task.high_classes))
    report["by_study"] = by_study(p.ds.slides, positive, p_high >= net.slide_threshold)
    report["data"]["export"] = export_record(p.ds)  # the dataset export (report["export"]: ONNX)
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
        environment=ctx.environment,
    )
    return report


def _save_fold_checkpoints(
    ctx: _Context,
    run: ModelRun,
    *,
    net: Scored,
    results: list[FitResult],
    fold_inputs: list[Inputs],
    golden_idx: list[int],
) -> None:
    """Rewrite each ``fold-K.pt`` with its own window, temperature and thresholds, so that
    ``omis export`` of it gives a bundle reproducing that fold's rows of predictions.csv."""
    if ctx.work is None:
        return
    for k, (res, inp, choice) in enumerate(zip(results, fold_inputs, net.per_fold, strict=True)):
        th = choice.thresholds.model_copy(
            update={"temperature": float(run.extra[k]["temperature"])}
        )
        fold = net.summary["per_fold"][k]
        meta = bundle_meta(
            ctx.p, ctx.opts, inp, th, {"fold": k + 1, "roc_auc": fold["roc_auc"], "n": fold["n"]}
        )
        save_checkpoint(
            ctx.work / "checkpoints" / f"fold-{k + 1}.pt",
            {
                **checkpoint_extra(ctx.p, meta, inp.inputs[golden_idx]),
                "model_state": res.state,
                "fold": k + 1,
            },
        )


def _baselines(
    p: Prepared, opts: TrainOptions, folds: list[tuple[I64, I64]], inner: list[tuple[I64, I64]]
) -> dict[str, tuple[Scored, ModelRun] | str]:
    spectra = p.spectra
    if spectra is None or p.ys is None:
        reason = "image dataset: no spectra for the classical baselines"
        return dict.fromkeys(BASELINES, reason)
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
            max_referral=opts.max_referral,
            referral_confidence=opts.referral_confidence,
            classes=p.task.classes,
        )
        out[name] = (scored, run)
    return out
