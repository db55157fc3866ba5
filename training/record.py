"""What the bundle and the checkpoints record about a training run."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
import torch

from inference.bundle import OperatingPoint, Thresholds, Training
from inference.render import RenderParams
from training.checkpoint import FORMAT
from training.export import BundleMeta, code_revision
from training.options import TrainOptions, pretrained_record
from training.window import Inputs

if TYPE_CHECKING:
    from training.prepared import Prepared

F32 = npt.NDArray[np.float32]


def bundle_meta(
    p: Prepared,
    opts: TrainOptions,
    inp: Inputs,
    thresholds: Thresholds,
    metrics: dict[str, Any],
    *,
    operating_point: OperatingPoint | None = None,
) -> BundleMeta:
    """The manifest's content besides the files."""
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
            operating_point=operating_point,
        ),
        qc=p.ds.qc.model_dump(),
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
        "qc": meta.qc,
    }


def metrics_summary(pooled: dict[str, Any], folds: int) -> dict[str, Any]:
    """The pooled metrics the bundle's ``training.metrics`` holds."""
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


def checkpoint_extra(p: Prepared, meta: BundleMeta, golden: F32) -> dict[str, Any]:
    """Everything a checkpoint holds besides the weights (``omis export`` rebuilds from it)."""
    return {
        "format": FORMAT,
        "preset": p.preset.to_json(),
        "num_classes": len(p.task.classes),
        "bundle_meta": meta_to_json(meta),
        "golden_inputs": torch.from_numpy(golden.copy()),
    }
