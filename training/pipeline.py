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
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import torch
from pydantic import BaseModel, ConfigDict, Field

from firmware_bridge.fsutil import atomic_directory
from inference.bundle import Pretrained, Thresholds, Training
from inference.exceptions import InferenceError
from inference.render import RenderParams, render_params_from_json
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
from training.data import Dataset, Task, get_task, load_dataset, sha256_path
from training.evaluate import make_folds, validation_split
from training.exceptions import ConfigError, DataError
from training.export import BundleMeta, code_revision, write_bundle
from training.model import Preset, VGG16Classifier, build_model, get_preset, load_pretrained
from training.outputs import build_report, write_outputs
from training.progress import Progress, Tick
from training.train import (
    Augment,
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
from training.window import Inputs, fit_inputs, image_inputs

log = logging.getLogger(__name__)

F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]
CHECKPOINT_FORMAT = FORMAT
GOLDEN_COUNT = 4
NETWORK_NAMES = {"paper": "vgg16", "tiny": "vgg16", "spectrum1d": "spectrum1d"}


class TrainOptions(BaseModel):
    """Everything ``omis train`` accepts; ``None`` takes the preset's value."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    data: Path = Field(description="dataset directory with manifest.csv")
    out: Path = Field(description="output directory (must not exist, or be empty)")
    task: Literal["binary", "pap4", "ii-v"] = "binary"
    preset: Literal["paper", "tiny", "spectrum1d"] = "tiny"
    folds: int = Field(5, ge=2)
    epochs: int | None = Field(None, ge=1)
    batch_size: int | None = Field(None, ge=2)
    lr: float | None = Field(None, gt=0.0)
    device: Literal["cpu", "cuda"] = "cpu"
    pretrained: Path | None = None
    from_scratch: bool = Field(False, description="paper preset: train from random weights")
    freeze_features: bool = False
    seed: int = Field(0, ge=0)
    name: str = Field("omis-vgg16", pattern=r"^[A-Za-z0-9._-]+$")
    version: int = Field(1, ge=1)
    max_slides: int | None = Field(None, ge=1)
    final: Literal["all", "best-fold"] = "all"
    target_sensitivity: float = Field(0.9, gt=0.0, le=1.0)
    temperature_scaling: bool = Field(False, description="fit a softmax temperature")
    out_of_range: float | None = Field(
        0.05, ge=0.0, le=1.0, description="bundle threshold on mass outside the render window"
    )
    spectrum_params: dict[str, Any] | None = None
    render_params: dict[str, Any] | None = Field(
        None, description="image datasets: the render parameters the images were drawn with"
    )
    allow_lossy: bool = Field(False, description="accept JPEG field images")
    cache_dir: Path | None = Field(None, description="default: DATA/.omis-cache")
    no_cache: bool = False
    augment: Augment = Augment()


@dataclass
class Prepared:
    """The data, with what every fold needs to make its network inputs."""

    ds: Dataset
    task: Task
    preset: Preset
    labels: I64
    axis: F64 | None
    ys: F64 | None
    given_render: RenderParams | None
    outside_task: int

    @property
    def spectra(self) -> list[tuple[F64, F64]] | None:
        """(x, y) of every slide, or None for image datasets."""
        if self.ys is None or self.axis is None:
            return None
        return [(self.axis, y) for y in self.ys]

    def inputs_for(self, fit_idx: I64) -> Inputs:
        """Network inputs of every slide, with the window fitted on ``fit_idx`` only."""
        if self.ys is None or self.axis is None:
            if self.given_render is None:
                raise ConfigError("image dataset without render parameters")
            return image_inputs(
                [s.image for s in self.ds.slides if s.image is not None], self.given_render
            )
        return fit_inputs(
            self.axis,
            self.ys,
            self.labels,
            fit_idx,
            size=self.preset.input_size,
            representation=self.preset.representation,
        )


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


def check_weights_decision(opts: TrainOptions) -> None:
    """The paper preset needs ``--pretrained PATH`` or ``--from-scratch``; others neither."""
    if opts.pretrained is not None and opts.from_scratch:
        raise ConfigError("--pretrained and --from-scratch exclude each other")
    if opts.preset == "paper" and opts.pretrained is None and not opts.from_scratch:
        raise ConfigError(
            "--preset paper needs a weights decision: --pretrained PATH (torchvision's ImageNet "
            "VGG16 state dict) or --from-scratch"
        )
    if opts.preset != "paper" and opts.pretrained is not None:
        raise ConfigError(f"--pretrained fits the paper preset only, not {opts.preset}")


def pretrained_record(opts: TrainOptions) -> Pretrained | None:
    """``{source, sha256}`` of the initial weights, None when trained from scratch."""
    if opts.pretrained is None:
        return None
    if not opts.pretrained.is_file():
        raise ConfigError(f"--pretrained {opts.pretrained}: no such file")
    return Pretrained(source=opts.pretrained.name, sha256=sha256_path(opts.pretrained))


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


def _given_render(opts: TrainOptions, preset: Preset) -> RenderParams:
    if opts.render_params is None:
        raise ConfigError(
            "image dataset: --render-params JSON|@FILE is required (the parameters the images "
            "were drawn with; the bundle records them and the device draws with them)"
        )
    try:
        render = render_params_from_json(opts.render_params)
    except InferenceError as exc:
        raise ConfigError(f"--render-params: {exc}") from exc
    if preset.representation == "image" and (render.height, render.width) != preset.input_size:
        raise ConfigError(
            f"--render-params: {render.width}x{render.height} images, the {preset.name} preset "
            f"reads {preset.input_size[1]}x{preset.input_size[0]}"
        )
    return render


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
        return Prepared(ds, task, preset, labels, None, None, _given_render(opts, preset), outside)
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


def _bundle_meta(
    p: Prepared, opts: TrainOptions, inp: Inputs, thresholds: Thresholds, metrics: dict[str, Any]
) -> BundleMeta:
    return BundleMeta(
        name=opts.name,
        version=opts.version,
        task=p.task.name,
        classes=p.task.classes,
        risk=dict(p.task.risk),
        input=inp.spec,
        spectrum=p.ds.params.model_dump(),
        render=inp.render.model_dump(),
        thresholds=thresholds.model_copy(
            update={"out_of_range": opts.out_of_range if p.ys is not None else None}
        ),
        training=Training(
            code_revision=code_revision(),
            data_manifest_sha256=p.ds.manifest_sha256,
            data_files_sha256=p.ds.files_sha256,
            metrics=metrics,
            preset=p.preset.name,
            pretrained=pretrained_record(opts),
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
        "render": RenderParams.model_validate(meta.render).model_dump(mode="json"),
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
        roc_auc_ci95=pooled.get("roc_auc_ci95"),
        n=pooled["n"],
        folds=folds,
        evaluation="stratified patient-grouped cross-validation, pooled out-of-fold; "
        "thresholds chosen on each fold's validation slides",
    )
    return out


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
        folds = make_folds(p.labels, p.ds.patients, opts.folds, opts.seed)
        with _output_dir(opts.out, info) as work:
            ctx = _Context(p, opts, cfg, work, {}, progress)
            report = _train_and_report(ctx, folds, info=info)
    seconds = time.monotonic() - started
    log.info("omis train finished in %.1f s: %s", seconds, opts.out)
    return TrainResult(opts.out, opts.out / "bundle", report, seconds)


def _checkpoint_extra(p: Prepared, meta: BundleMeta, golden: F32) -> dict[str, Any]:
    return {
        "format": CHECKPOINT_FORMAT,
        "preset": p.preset.to_json(),
        "num_classes": len(p.task.classes),
        "bundle_meta": meta_to_json(meta),
        "golden_inputs": torch.from_numpy(golden.copy()),
    }


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
    meta = _bundle_meta(p, opts, all_inp, Thresholds(), {})
    ctx.extra.update(_checkpoint_extra(p, meta, all_inp.inputs[golden_idx]))
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
        from training.thresholds import softmax_t

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
    meta = _bundle_meta(
        p,
        opts,
        inp,
        net.shipped.thresholds,
        _metrics_summary(net.summary["pooled"], len(folds)),
    )
    ctx.extra.update(_checkpoint_extra(p, meta, inp.inputs[golden_idx]))
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
