"""Metrics against scikit-learn and statsmodels; peak features of the baselines."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import brier_score_loss, roc_auc_score
from sklearn.metrics import confusion_matrix as sk_confusion
from statsmodels.stats.proportion import proportion_confint

from training.baselines import peak_features
from training.metrics import (
    calibration,
    classification_metrics,
    roc_auc,
    threshold_at_sensitivity,
    wilson_interval,
)


@pytest.mark.parametrize(("k", "n"), [(0, 1), (0, 10), (3, 10), (10, 10), (83, 100), (1, 441)])
def test_wilson_matches_statsmodels(k: int, n: int) -> None:
    lo, hi = proportion_confint(k, n, alpha=0.05, method="wilson")
    got = wilson_interval(k, n)
    assert got == pytest.approx((lo, hi), abs=1e-12)


def test_auc_matches_sklearn_with_ties() -> None:
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 200).astype(bool)
    s = np.round(rng.random(200) + 0.3 * y, 1)  # rounding makes many ties
    assert roc_auc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert roc_auc(np.ones(5, bool), s[:5]) is None


def test_classification_metrics_binary() -> None:
    rng = np.random.default_rng(2)
    y = rng.integers(0, 2, 60)
    p_high = np.clip(0.5 * y + rng.random(60) * 0.6, 0, 1)
    probs = np.stack([1 - p_high, p_high], axis=1)
    m = classification_metrics(y, probs, (1,), threshold=0.5, target_sensitivity=0.9)
    pred = (p_high >= 0.5).astype(int)
    cm = sk_confusion(y, pred, labels=[0, 1])
    assert m["confusion_matrix"] == cm.tolist()
    tn, fp, fn, tp = cm.ravel()
    assert m["sensitivity"]["value"] == pytest.approx(tp / (tp + fn))
    assert m["specificity"]["value"] == pytest.approx(tn / (tn + fp))
    assert m["accuracy"]["value"] == pytest.approx((tp + tn) / 60)
    lo, hi = proportion_confint(tp, tp + fn, method="wilson")
    assert m["sensitivity"]["ci95"] == pytest.approx([lo, hi])
    assert m["roc_auc"] == pytest.approx(roc_auc_score(y, p_high))
    assert m["calibration"]["brier"] == pytest.approx(brier_score_loss(y, p_high))


def test_pap4_uses_risk_for_sensitivity() -> None:
    y = np.array([0, 1, 2, 3])
    probs = np.array(
        [[0.7, 0.1, 0.1, 0.1], [0.1, 0.2, 0.6, 0.1], [0.1, 0.1, 0.1, 0.7], [0.1, 0.1, 0.2, 0.6]]
    )
    m = classification_metrics(y, probs, (2, 3))
    assert m["sensitivity"]["successes"] == 2 and m["sensitivity"]["n"] == 2
    assert m["specificity"]["successes"] == 1  # class III was called high risk
    assert m["accuracy"]["successes"] == 2  # argmax right for II and V only
    assert np.asarray(m["confusion_matrix"]).sum() == 4


def test_threshold_reaches_target() -> None:
    y = np.array([1, 1, 1, 1, 0, 0, 0, 0], bool)
    s = np.array([0.9, 0.8, 0.4, 0.2, 0.7, 0.3, 0.1, 0.05])
    t = threshold_at_sensitivity(y, s, 0.75)
    assert t["threshold"] == 0.4 and t["sensitivity"] == 0.75
    assert t["specificity"] == pytest.approx(0.75)


def test_calibration_perfect_and_ece() -> None:
    y = np.array([0, 0, 1, 1], bool)
    c = calibration(y, np.array([0.0, 0.0, 1.0, 1.0]))
    assert c["brier"] == 0.0 and c["ece"] == 0.0
    c = calibration(y, np.array([0.55, 0.55, 0.55, 0.55]))
    assert c["ece"] == pytest.approx(0.05)
    assert sum(b["count"] for b in c["bins"]) == 4


def test_peak_features_fixed_length_and_positions() -> None:
    x = np.linspace(-144.5, 144.5, 290)
    y = np.exp(-(((x - 30) / 5) ** 2)) - 0.5 * np.exp(-(((x + 60) / 5) ** 2))
    f = peak_features(x, y, k=3)
    assert f.shape == (12,)
    assert f[0] == pytest.approx(30, abs=1.0) and f[1] == pytest.approx(1.0, abs=0.01)
    assert f[6] == pytest.approx(-60, abs=1.0) and f[7] == pytest.approx(0.5, abs=0.01)
    assert np.all(f[2:6] == 0.0)  # missing peaks are padded
