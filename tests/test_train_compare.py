"""DeLong, McNemar, thresholds on validation, temperature, per class and per patient."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score
from statsmodels.stats.contingency_tables import mcnemar

from training.compare import (
    auc_with_interval,
    collapsed,
    delong,
    delong_paired,
    mcnemar_paired,
    per_class,
    per_patient,
)
from training.thresholds import choose_thresholds, fit_temperature, softmax_t


def _pairwise_delong(pos: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """DeLong's covariance from its definition: the psi kernel over all (positive, negative)."""
    out = np.zeros((2, 2))
    comps = []
    for s in (a, b):
        x, y = s[pos], s[~pos]
        psi = (x[:, None] > y[None, :]) + 0.5 * (x[:, None] == y[None, :])
        comps.append((psi.mean(axis=1), psi.mean(axis=0)))
    m, n = int(pos.sum()), int((~pos).sum())
    for i in range(2):
        for j in range(2):
            out[i, j] = np.cov(comps[i][0], comps[j][0])[0, 1] / m + (
                np.cov(comps[i][1], comps[j][1])[0, 1] / n
            )
    return out


def test_delong_matches_its_definition_and_sklearn() -> None:
    rng = np.random.default_rng(3)
    pos = rng.random(120) < 0.4
    a = np.round(rng.normal(pos * 1.0, 1.0), 1)  # rounded: ties
    b = rng.normal(pos * 0.5, 1.0)
    aucs, cov = delong(pos, [a, b])
    assert aucs[0] == pytest.approx(roc_auc_score(pos, a))
    assert aucs[1] == pytest.approx(roc_auc_score(pos, b))
    assert cov == pytest.approx(_pairwise_delong(pos, a, b), rel=1e-9, abs=1e-12)
    ci = auc_with_interval(pos, a)["ci95"]
    assert ci[0] < aucs[0] < ci[1]
    same = delong_paired(pos, a, a)
    assert same["auc_difference"] == 0.0 and same["p_value"] == 1.0
    diff = delong_paired(pos, a, b)
    assert 0.0 <= diff["p_value"] <= 1.0


def test_auc_interval_needs_two_of_each_class() -> None:
    pos = np.array([True, False, False])
    assert auc_with_interval(pos, np.array([0.9, 0.1, 0.2]))["ci95"] is None


def test_mcnemar_matches_statsmodels() -> None:
    a = np.array([1, 1, 0, 1, 0, 1, 1, 1, 0, 1], dtype=bool)
    b = np.array([1, 0, 0, 0, 0, 0, 1, 0, 1, 0], dtype=bool)
    got = mcnemar_paired(a, b)
    assert got["table"] == [[2, 5], [1, 2]]
    assert got["p_value"] == pytest.approx(mcnemar([[2, 5], [1, 2]], exact=True).pvalue)


def test_thresholds_reach_the_target_on_validation() -> None:
    rng = np.random.default_rng(0)
    pos = rng.random(200) < 0.3
    p = np.clip(rng.normal(0.3 + 0.4 * pos, 0.15), 0.0, 1.0)
    c = choose_thresholds(pos, p, 0.9, max_referral=1.0)
    th = c.thresholds
    assert th.chosen_on == "validation" and c.problem is None
    # read off the smoothed distributions: the empirical figures are close, not exact
    assert float((p[pos] >= th.decision).mean()) >= 0.9 - 0.03
    assert th.abstain_low <= th.decision <= th.abstain_high
    assert float((p[pos] >= th.abstain_low).mean()) >= 0.98 - 0.02
    assert float((p[~pos] < th.abstain_high).mean()) >= 0.98 - 0.02


def test_one_class_validation_keeps_defaults_and_says_so() -> None:
    c = choose_thresholds(np.zeros(5, dtype=bool), np.linspace(0, 1, 5), 0.9)
    assert c.thresholds.chosen_on == "default" and c.problem


def test_temperature_recovers_overconfidence() -> None:
    rng = np.random.default_rng(1)
    z = rng.normal(0, 1.0, (4000, 2))
    y = np.array([rng.choice(2, p=softmax_t(row[None], 1.0)[0]) for row in z])
    assert fit_temperature(z * 3.0, y) == pytest.approx(3.0, rel=0.15)
    assert softmax_t(z, 2.0).sum(axis=1) == pytest.approx(np.ones(len(z)))


def test_per_class_and_collapse() -> None:
    y = np.array([0, 0, 1, 1, 2, 2, 3, 3])
    pred = np.array([0, 1, 1, 1, 2, 0, 3, 3])
    pc = per_class(y, pred, ("II", "III", "IV", "V"))
    assert pc["III"]["sensitivity"]["value"] == 1.0
    assert pc["III"]["specificity"]["value"] == pytest.approx(5 / 6)
    assert pc["III"]["f1"]["value"] == pytest.approx(2 * 2 / (2 * 2 + 1 + 0))
    assert pc["V"]["f1"]["value"] == 1.0
    lo, hi = pc["II"]["f1"]["ci95"]
    assert 0.0 <= lo <= pc["II"]["f1"]["value"] <= hi <= 1.0
    assert collapsed(y, np.zeros(8, dtype=np.int64))
    assert not collapsed(np.zeros(3, dtype=np.int64), np.zeros(3, dtype=np.int64))
    assert not collapsed(y, pred)


def test_per_patient_mean_probability() -> None:
    patients = ["a", "a", "b", "c", "c"]
    pos = np.array([True, False, False, False, False])
    p = np.array([0.9, 0.3, 0.2, 0.1, 0.95])
    got = per_patient(patients, pos, p, np.full(5, 0.5))
    assert got is not None and got["patients"] == 3
    assert got["sensitivity"]["value"] == 1.0  # a: mean 0.6 >= 0.5
    assert got["specificity"]["value"] == 0.5  # b: 0.2 low (right), c: mean 0.525 high (wrong)
    assert per_patient(["a", "b"], pos[:2], p[:2], np.full(2, 0.5)) is None


def test_thresholds_never_depend_on_test_predictions() -> None:
    """Changing every test probability leaves every chosen threshold as it was."""
    from training.crossval import ModelRun, score_model

    rng = np.random.default_rng(4)
    labels = np.array([0, 1] * 30, dtype=np.int64)
    folds = [(np.arange(30, 60), np.arange(0, 30)), (np.arange(0, 30), np.arange(30, 60))]
    inner = [(tr[:20], tr[20:]) for tr, _ in folds]

    def probs() -> np.ndarray:
        p = np.clip(rng.normal(0.3 + 0.4 * labels, 0.2), 0.0, 1.0)
        return np.stack([1 - p, p], axis=1)

    val = [probs()[v] for _, v in inner]
    a = score_model(ModelRun(probs(), val), labels, folds, inner, high=(1,), target=0.9)
    b = score_model(ModelRun(probs(), val), labels, folds, inner, high=(1,), target=0.9)
    assert a.summary["thresholds"] == b.summary["thresholds"]
    assert np.array_equal(a.slide_threshold, b.slide_threshold)
    assert a.summary["thresholds"]["chosen_on"] == "validation"
    assert a.summary["pooled"]["threshold"] is None  # pooled over folds: one per fold
