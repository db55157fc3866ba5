"""Cross-validation grouped by patient, and evaluation of a finished bundle on a dataset.

Folds: scikit-learn's ``StratifiedGroupKFold`` on the task labels with the patient as group,
so no patient's slides are ever on both sides of a split.  Inside each training fold a further
patient-grouped split holds out about a fifth for early stopping.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from sklearn.model_selection import StratifiedGroupKFold

from inference.backends import BackendOptions
from inference.bundle import Bundle, InputSpec, load_bundle
from inference.exceptions import BundleError, InferenceError
from inference.preprocess import spectrum_to_tensor, to_tensor
from inference.render import RenderParams, render_params_from_json, render_spectrum
from inference.spectrum import parse_params
from training.compare import auc_with_interval, collapse_reason, per_class
from training.data import Dataset, Slide, get_task, load_dataset
from training.exceptions import DataError, TrainingError
from training.metrics import classification_metrics, high_risk_probability, predict_classes

log = logging.getLogger(__name__)

F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]
U8 = npt.NDArray[np.uint8]
Fold = tuple[I64, I64]
VALIDATION_SPLITS = 5
EVAL_BATCH = 8


def make_folds(labels: I64, groups: Sequence[str], k: int, seed: int) -> list[Fold]:
    """Stratified K folds grouped by patient: (train indices, test indices) per fold."""
    n_groups = len(set(groups))
    if k < 2:
        raise DataError(f"--folds must be >= 2, got {k}")
    if n_groups < k:
        raise DataError(f"{k} folds need at least {k} patients, the data has {n_groups}")
    splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    x = np.zeros((labels.size, 1))
    return [
        (np.asarray(tr, dtype=np.int64), np.asarray(te, dtype=np.int64))
        for tr, te in splitter.split(x, labels, groups=list(groups))
    ]


def validation_split(idx: I64, labels: I64, groups: Sequence[str], seed: int) -> tuple[I64, I64]:
    """Split training indices into (fit, validation) by patient; no validation with < 3 patients."""
    sub_groups = [groups[i] for i in idx]
    n_groups = len(set(sub_groups))
    if n_groups < 3:
        return idx, np.zeros(0, dtype=np.int64)
    # fewer splits than members of the rarest class would make sklearn warn and mis-stratify
    rarest = int(np.bincount(labels[idx])[np.unique(labels[idx])].min())
    k = max(2, min(VALIDATION_SPLITS, n_groups, rarest))
    splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed + 1)
    fit_i, val_i = next(splitter.split(np.zeros((idx.size, 1)), labels[idx], groups=sub_groups))
    return idx[fit_i], idx[val_i]


def spectra_images(slides: Sequence[Slide], render: RenderParams) -> list[U8]:
    """The spectrum image of every slide (rendered, or as given for image datasets)."""
    images = []
    for s in slides:
        if s.image is not None:
            images.append(s.image)
        elif s.x_nm is not None and s.y is not None:
            images.append(render_spectrum(s.x_nm, s.y, render))
        else:
            raise DataError(f"slide {s.slide_id!r} has neither a spectrum nor an image")
    return images


def network_inputs(images: Sequence[U8], spec: InputSpec) -> F32:
    """The one preprocessing of training and device: :func:`inference.preprocess.to_tensor`."""
    try:
        return to_tensor(list(images), spec)
    except InferenceError as exc:
        raise DataError(f"spectrum images do not fit the model input: {exc}") from exc


@dataclass
class FoldPredictions:
    """Out-of-fold probabilities of one model family on all folds."""

    probs: F64
    folds: list[Fold]
    extra: list[dict[str, Any]] = field(default_factory=list)


def summarize(
    labels: I64,
    preds: FoldPredictions,
    high_classes: Sequence[int],
    threshold: float | F64,
    target_sensitivity: float,
    *,
    classes: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Per-fold and pooled metrics of out-of-fold predictions.

    ``threshold``: one for all slides, or one per slide (each fold's own).  A fold whose test
    slides hold several classes but nearly all got one prediction, or whose validation loss is
    at chance level, is flagged ``collapsed`` (:func:`~training.compare.collapse_reason`); with
    ``classes`` the per-class metrics are added (pooled).
    """
    thr = np.broadcast_to(np.asarray(threshold, dtype=np.float64), labels.shape)
    per_fold = []
    for i, (_, test) in enumerate(preds.folds):
        m = classification_metrics(
            labels[test],
            preds.probs[test],
            high_classes,
            threshold=float(thr[test][0]) if test.size else 0.5,
            target_sensitivity=target_sensitivity,
        )
        pred = predict_classes(preds.probs[test], high_classes, thr[test])
        extra = preds.extra[i] if i < len(preds.extra) else {}
        why = collapse_reason(labels[test], pred, extra.get("best_val_loss"), preds.probs.shape[1])
        per_fold.append(
            {"fold": i + 1, **extra, **m, "collapsed": why is not None, "collapse_reason": why}
        )
    pooled = classification_metrics(
        labels,
        preds.probs,
        high_classes,
        threshold=threshold,
        target_sensitivity=target_sensitivity,
    )
    positive = np.isin(labels, list(high_classes))
    pooled["roc_auc_ci95"] = auc_with_interval(
        positive, high_risk_probability(preds.probs, high_classes)
    )["ci95"]
    if classes is not None:
        pred = predict_classes(preds.probs, high_classes, thr)
        pooled["per_class"] = per_class(labels, pred, classes)
    return {
        "per_fold": per_fold,
        "pooled": pooled,
        "collapsed_folds": [f["fold"] for f in per_fold if f["collapsed"]],
    }


# --- a finished bundle on a dataset -----------------------------------------------------------


def evaluate_bundle(
    bundle_path: str | Path,
    data_dir: str | Path,
    *,
    cache_dir: str | Path | None = None,
    max_slides: int | None = None,
    run: Callable[[bytes, F32], F32] | None = None,
) -> dict[str, Any]:
    """Metrics of a bundle on a dataset, with its own parameters, through the device's code.

    Spectra, QC, rendering and preprocessing are the device's functions; the model runs in the
    device's ONNX Runtime backend after the golden gate (``run`` replaces that, for tests).
    """
    try:
        bundle = load_bundle(bundle_path)
        m = bundle.manifest
        params = parse_params(m.spectrum)
        render = render_params_from_json(m.render)
    except (BundleError, InferenceError) as exc:
        raise TrainingError(f"bundle {bundle_path}: {exc}") from exc
    task = get_task(m.task)
    if tuple(task.classes) != tuple(m.classes):
        raise TrainingError(f"bundle classes {m.classes} differ from task {task.name}")
    ds: Dataset = load_dataset(data_dir, params, cache_dir=cache_dir, max_slides=max_slides)
    kept = tuple(s for s in ds.slides if s.pap_group in task.group_to_class)
    ds = dataclasses.replace(ds, slides=kept)
    if not kept:
        raise DataError(f"{data_dir}: no slides of the task {task.name}")
    if m.input.representation == "spectrum":
        try:
            inputs = spectrum_to_tensor([s.y for s in ds.slides if s.y is not None], m.input)
        except InferenceError as exc:
            raise DataError(f"spectra do not fit the model input: {exc}") from exc
    else:
        inputs = network_inputs(spectra_images(ds.slides, render), m.input)
    if run is None:
        probs, backend = device_probabilities(bundle, inputs)
    else:
        probs = run(bundle.model_path.read_bytes(), inputs).astype(np.float64)
        backend = {"name": "custom"}
    labels = task.labels(ds.groups)
    metrics = classification_metrics(
        labels, probs.astype(np.float64), m.high_classes, threshold=m.thresholds.decision
    )
    return {
        "bundle": bundle.describe(),
        "data": str(data_dir),
        "data_manifest_sha256": ds.manifest_sha256,
        "task": task.name,
        "classes": list(task.classes),
        "preparation": ds.stats.to_json(),
        "backend": backend,
        "metrics": metrics,
        "predictions": [
            {"slide_id": sl.slide_id, "probabilities": [float(v) for v in p]}
            for sl, p in zip(ds.slides, probs, strict=True)
        ],
    }


def device_probabilities(bundle: Bundle, inputs: F32) -> tuple[F64, dict[str, Any]]:
    """Probabilities from the device's golden-checked ONNX Runtime backend, in its batches."""
    from inference.golden import open_checked

    try:
        backend, _ = open_checked("onnxruntime", bundle, BackendOptions(max_batch=EVAL_BATCH))
    except InferenceError as exc:
        raise TrainingError(f"bundle {bundle.root}: {exc}") from exc
    with backend:
        chunks = [
            backend.infer(inputs[i : i + EVAL_BATCH]) for i in range(0, len(inputs), EVAL_BATCH)
        ]
        info = backend.describe()
    return np.concatenate(chunks).astype(np.float64), info
