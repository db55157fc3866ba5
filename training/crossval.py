"""Cross-validation of the network and the baselines on the same folds, thresholds on validation.

Each fold: the render window and input scale are fitted on the fold's training slides
(:mod:`training.window`), the network is fitted on the fold's inner "fit" part with early
stopping on its inner validation part, and every model's decision threshold (and the
network's optional temperature) is chosen on that validation part (:mod:`training.thresholds`).
The fold's test slides are scored with those and nothing else.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from training.evaluate import FoldPredictions, summarize
from training.metrics import high_risk_probability, referral_figures
from training.thresholds import (
    DEFAULT_MAX_REFERRAL,
    DEFAULT_REFERRAL_CONFIDENCE,
    Choice,
    choose_thresholds,
    fit_temperature,
    softmax_t,
)
from training.train import FitConfig, FitResult, predict_logits, resolve_device
from training.window import Inputs

log = logging.getLogger(__name__)

F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]
Fold = tuple[I64, I64]


@dataclass
class ModelRun:
    """Out-of-fold test probabilities of one model, its validation probabilities per fold."""

    probs: F64
    val_probs: list[F64]
    extra: list[dict[str, Any]] = field(default_factory=list)
    val_logits: list[F64] = field(default_factory=list)


@dataclass
class Scored:
    """A model's thresholds (per fold and shipped) and its metrics at them."""

    per_fold: list[Choice]
    shipped: Choice
    slide_threshold: F64
    summary: dict[str, Any]
    band_low: F64 = field(default_factory=lambda: np.zeros(0))
    band_high: F64 = field(default_factory=lambda: np.zeros(0))


def score_model(
    run: ModelRun,
    labels: I64,
    folds: Sequence[Fold],
    inner: Sequence[Fold],
    *,
    high: Sequence[int],
    target: float,
    temperature: float = 1.0,
    shipped_val: F64 | None = None,
    classes: Sequence[str] | None = None,
    max_referral: float = DEFAULT_MAX_REFERRAL,
    referral_confidence: float = DEFAULT_REFERRAL_CONFIDENCE,
) -> Scored:
    """Choose each fold's thresholds on its validation slides and score its test slides.

    Besides the metrics at the decision threshold, the summary gives what the device would do
    with each fold's abstain band (:func:`~training.metrics.referral_figures`), per fold and
    pooled.
    """
    positive = np.isin(labels, list(high))
    choices = []
    slide_thr = np.zeros(labels.size, dtype=np.float64)
    band_lo = np.zeros(labels.size, dtype=np.float64)
    band_hi = np.zeros(labels.size, dtype=np.float64)
    for (_, test), (_, val), vp in zip(folds, inner, run.val_probs, strict=True):
        c = choose_thresholds(
            positive[val],
            high_risk_probability(vp, high),
            target,
            max_referral=max_referral,
            confidence=referral_confidence,
        )
        choices.append(c)
        slide_thr[test] = c.thresholds.decision
        band_lo[test], band_hi[test] = c.thresholds.abstain_low, c.thresholds.abstain_high
    all_val = np.concatenate([v for _, v in inner])
    pooled_val = shipped_val if shipped_val is not None else np.concatenate(run.val_probs)
    shipped = choose_thresholds(
        positive[all_val],
        high_risk_probability(pooled_val, high),
        target,
        temperature,
        max_referral=max_referral,
        confidence=referral_confidence,
    )
    summary = summarize(
        labels,
        FoldPredictions(run.probs, list(folds), run.extra),
        high,
        slide_thr,
        target,
        classes=classes,
    )
    p_high = high_risk_probability(run.probs, high)
    summary["pooled"].update(referral_figures(positive, p_high, band_lo, band_hi))
    for f, (_, test) in zip(summary["per_fold"], folds, strict=True):
        f.update(referral_figures(positive[test], p_high[test], band_lo[test], band_hi[test]))
    summary["thresholds"] = {
        "chosen_on": "validation",
        "max_referral": max_referral,
        "referral_confidence": referral_confidence,
        "method": "smoothed (Gaussian-kernel) class score distributions on the logit scale; "
        "band narrowed until it holds at most as many validation slides as keep the referral "
        "rate on new slides within --max-referral at --referral-confidence (order statistics, "
        "Beta bound), and refers at most --max-referral on the smoothed fit "
        "(training.thresholds)",
        "per_fold": [c.to_json() for c in choices],
        "shipped": shipped.to_json(),
    }
    return Scored(choices, shipped, slide_thr, summary, band_lo, band_hi)


FitFn = Callable[[int, I64, I64, Inputs], FitResult]


def cross_validate_network(
    make_inputs: Callable[[I64], Inputs],
    fit_fold: FitFn,
    model_for: Callable[[FitResult], torch.nn.Module],
    *,
    labels: I64,
    folds: Sequence[Fold],
    inner: Sequence[Fold],
    cfg: FitConfig,
    num_classes: int,
    temperature_scaling: bool,
) -> tuple[ModelRun, list[FitResult], list[Inputs]]:
    """Train one network per fold; test and validation probabilities (temperature applied)."""
    device = resolve_device(cfg.device)
    run = ModelRun(np.zeros((labels.size, num_classes), dtype=np.float64), [])
    results, inputs = [], []
    for k, ((train, test), (fit_i, val_i)) in enumerate(zip(folds, inner, strict=True), start=1):
        inp = make_inputs(train)
        res = fit_fold(k, fit_i, val_i, inp)
        model = model_for(res)
        z_val = predict_logits(model, inp.inputs[val_i], cfg.batch_size, device).double().numpy()
        z_test = predict_logits(model, inp.inputs[test], cfg.batch_size, device).double().numpy()
        t = fit_temperature(z_val, labels[val_i]) if temperature_scaling else 1.0
        run.probs[test] = softmax_t(z_test, t)
        run.val_probs.append(softmax_t(z_val, t))
        run.val_logits.append(z_val)
        run.extra.append(
            {
                "best_epoch": res.best_epoch,
                "epochs_run": res.epochs_run,
                "best_val_loss": res.best_val_loss,
                "temperature": t,
                "n_fit": int(fit_i.size),
                "n_val": int(val_i.size),
                "n_test": int(test.size),
                "render_window_nm": list(inp.render.x_range_nm or ()),
                "history": res.history,
            }
        )
        results.append(res)
        inputs.append(inp)
        log.info(
            "fold %d/%d: best epoch %d of %d, val loss %s, temperature %.3g",
            k,
            len(folds),
            res.best_epoch,
            res.epochs_run,
            res.best_val_loss,
            t,
        )
    return run, results, inputs


def checkpoint_path(work: Path | None, name: str) -> Path | None:
    """``work/checkpoints/name`` or None when this process writes nothing."""
    return work / "checkpoints" / name if work is not None else None
