"""The operating point: a referral rate bounded by ``--max-referral``, stable on small validation
sets, and reported (issue 21 item 1)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from training.crossval import ModelRun, score_model
from training.thresholds import choose_thresholds


def _scores(rng: np.random.Generator, n: int, shift: float = 1.5) -> tuple[np.ndarray, np.ndarray]:
    """Overlapping classes (AUC about 0.85), a third positive, as p(high)."""
    pos = rng.random(n) < 1 / 3
    z = rng.normal(0.0, 1.0, n) + shift * pos - 1.0
    return pos, 1.0 / (1.0 + np.exp(-z))


def _referred(p: np.ndarray, lo: float | np.ndarray, hi: float | np.ndarray) -> np.ndarray:
    out: np.ndarray = (p >= lo) & (p <= hi)
    return out


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
@pytest.mark.parametrize("max_referral", [0.1, 0.2])
def test_small_validation_set_keeps_the_referral_bound_on_new_slides(
    seed: int, max_referral: float
) -> None:
    """Thresholds chosen on ~40 validation slides refer about ``max_referral`` of new slides,
    never most of them, and still reach the sensitivity target when a referral is reviewed."""
    rng = np.random.default_rng(seed)
    pos_v, p_v = _scores(rng, 40)
    pos_t, p_t = _scores(rng, 20000)
    th = choose_thresholds(pos_v, p_v, 0.9, max_referral=max_referral).thresholds
    referred = _referred(p_t, th.abstain_low, th.abstain_high)
    assert referred.mean() <= max_referral + 0.1, referred.mean()
    caught = (p_t[pos_t] >= th.abstain_low).mean()  # decided high, or referred to a person
    assert caught >= 0.9 - 0.12, caught


def test_the_bound_holds_on_the_validation_fit_and_says_when_targets_conflict() -> None:
    rng = np.random.default_rng(7)
    pos, p = _scores(rng, 400, shift=1.0)  # weak separation: the 98 % band is very wide
    c = choose_thresholds(pos, p, 0.9, max_referral=0.15)
    assert c.expected is not None
    assert c.expected["referral_rate"] <= 0.15 + 1e-9
    assert c.problem is not None and "max-referral" in c.problem
    wide = choose_thresholds(pos, p, 0.9, max_referral=1.0)
    assert wide.problem is None
    assert wide.thresholds.abstain_high - wide.thresholds.abstain_low > (
        c.thresholds.abstain_high - c.thresholds.abstain_low
    )


def test_no_referral_allowed_gives_a_plain_decision() -> None:
    rng = np.random.default_rng(3)
    pos, p = _scores(rng, 60)
    th = choose_thresholds(pos, p, 0.9, max_referral=0.0).thresholds
    assert th.abstain_low == th.decision == th.abstain_high


def test_report_counts_referrals_and_both_sensitivities() -> None:
    """Per model: the share of test slides referred (Wilson), sensitivity/specificity on the
    decided slides and with each referral counted as a correct human review."""
    rng = np.random.default_rng(11)
    n = 120
    labels = (rng.random(n) < 0.4).astype(np.int64)
    p = 1.0 / (1.0 + np.exp(-(rng.normal(0, 1, n) + 1.5 * labels - 0.7)))
    probs = np.stack([1 - p, p], axis=1)
    folds = [(np.arange(60, 120), np.arange(0, 60)), (np.arange(0, 60), np.arange(60, 120))]
    inner = [(tr[:30], tr[30:]) for tr, _ in folds]
    run = ModelRun(probs, [probs[v] for _, v in inner])
    sc = score_model(run, labels, folds, inner, high=[1], target=0.9, max_referral=0.2)
    pooled = sc.summary["pooled"]
    lo = np.zeros(n)
    hi = np.zeros(n)
    for (_, te), c in zip(folds, sc.per_fold, strict=True):
        lo[te], hi[te] = c.thresholds.abstain_low, c.thresholds.abstain_high
    referred = _referred(p, lo, hi)
    rr = pooled["referral_rate"]
    assert (rr["successes"], rr["n"]) == (int(referred.sum()), n)
    assert rr["ci95"][0] <= rr["value"] <= rr["ci95"][1]
    pos = labels == 1
    decided = ~referred
    called = p >= hi  # decided slides are outside the band: high above it
    sens_d = pooled["sensitivity_decided"]
    assert (sens_d["successes"], sens_d["n"]) == (
        int((called & pos & decided).sum()),
        int((pos & decided).sum()),
    )
    spec_r = pooled["specificity_with_review"]
    assert spec_r["successes"] == int((~pos & (referred | (p < lo))).sum())
    sens_r = pooled["sensitivity_with_review"]
    assert sens_r["successes"] == int((pos & (referred | called)).sum())


def test_the_window_keeps_the_separating_bins_of_a_low_mass_tail() -> None:
    """The classes differ only at -35 nm, far in a tail holding < 1 % of the mass: a window
    fitted on mass alone cuts the signal out; the fitted window keeps it (issue 21 item 4)."""
    from inference.render import RenderParams
    from training.window import discriminative_coverage, fit_render_window

    rng = np.random.default_rng(5)
    x = np.linspace(-50.0, 50.0, 101)
    n = 80
    labels = (np.arange(n) % 2).astype(np.int64)
    peak = np.exp(-0.5 * (x / 6.0) ** 2)
    ys = peak[None, :] * (1.0 + 0.05 * rng.normal(size=(n, 1))) + 0.002 * rng.normal(size=(n, 101))
    tail = np.abs(x + 35.0) <= 2.0
    ys[:, tail] += 0.004 * labels[:, None]  # tiny in mass, but it is the whole difference
    lo, hi = fit_render_window(x, ys, labels)
    assert lo <= -36.0, (lo, hi)
    cov = discriminative_coverage(x, ys, labels, RenderParams(x_range_nm=(lo, hi)))
    assert cov is not None and cov >= 0.9
    narrow = discriminative_coverage(x, ys, labels, RenderParams(x_range_nm=(-15.0, 15.0)))
    assert narrow is not None and narrow < 0.5


def test_baseline_thresholds_are_applied_to_the_fit_they_were_chosen_on() -> None:
    """A baseline's test probabilities come from the same model (fitted on the fold's fit
    part) whose validation probabilities chose its thresholds."""
    from sklearn.naive_bayes import GaussianNB

    from training.baselines import cross_val_baselines

    rng = np.random.default_rng(2)
    n = 60
    labels = (np.arange(n) % 2).astype(np.int64)
    x = rng.normal(size=(n, 20)) + labels[:, None] * 0.8
    folds = [(np.arange(30, 60), np.arange(0, 30)), (np.arange(0, 30), np.arange(30, 60))]
    inner = [(tr[:20], tr[20:]) for tr, _ in folds]
    probs, val = cross_val_baselines({"peaks": x}, labels, folds, 2, 0, inner=inner)["naive_bayes"]
    for (_, test), (fit_i, val_i), v in zip(folds, inner, val, strict=True):
        clf = GaussianNB().fit(x[fit_i], labels[fit_i])
        assert np.allclose(probs[test], clf.predict_proba(x[test]))
        assert np.allclose(v, clf.predict_proba(x[val_i]))


def test_the_one_bin_rule_finds_the_separating_bin() -> None:
    from training.baselines import BestBinRule
    from training.metrics import roc_auc

    rng = np.random.default_rng(8)
    y = (np.arange(200) % 2).astype(np.int64)
    x = rng.normal(size=(200, 30))
    x[:, 17] -= 1.5 * y  # lower in the high-risk class: the sign is learnt too
    rule = BestBinRule().fit(x[:100], y[:100])
    assert rule.bin_ == 17
    p = rule.predict_proba(x[100:])[:, 1]
    assert (roc_auc(y[100:] == 1, p) or 0.0) > 0.8


def test_collapse_is_flagged_from_the_prediction_shares_and_the_loss() -> None:
    """A 4-class fold predicting one class for 52 of 53 slides is collapsed (the former rule
    needed all 53), and so is a fold whose validation loss is at chance level."""
    from training.compare import collapse_reason

    truth = np.array([0] * 18 + [1] * 14 + [2] * 6 + [3] * 15, dtype=np.int64)
    pred = np.zeros(53, dtype=np.int64)
    pred[0] = 3
    why = collapse_reason(truth, pred)
    assert why is not None and "52 of 53" in why
    mixed = truth.copy()
    assert collapse_reason(truth, mixed, val_loss=0.9, num_classes=4) is None
    chance = collapse_reason(truth, mixed, val_loss=float(np.log(4)) - 0.01, num_classes=4)
    assert chance is not None and "chance" in chance
    assert collapse_reason(np.zeros(20, dtype=np.int64), np.zeros(20, dtype=np.int64)) is None


def test_the_report_counts_the_slides_the_task_used() -> None:
    """``--task ii-v`` on 160 slides trains on the 104 of groups II and V: the report says 104
    (the preparation's own count, 160, used to overwrite it)."""
    from pathlib import Path
    from types import SimpleNamespace

    from training.data import PrepStats
    from training.outputs import data_record

    stats = PrepStats(slides_in_manifest=160, slides_used=160, cache_hits=3, cache_misses=157)
    slides = [SimpleNamespace(slide_id=f"s{i}") for i in range(104)]
    ds = SimpleNamespace(
        stats=stats,
        slides=slides,
        kind="fields",
        patients=[f"p{i}" for i in range(104)],
        manifest_sha256="0" * 64,
        files_sha256="1" * 64,
    )
    rec = data_record(SimpleNamespace(ds=ds, outside_task=56), Path("d"))  # type: ignore[arg-type]
    assert (rec["slides_used"], rec["slides_outside_task"], rec["slides_prepared"]) == (
        104,
        56,
        160,
    )
    assert "cache_hits" not in rec  # describes the run, not the result: config.json


def _logits(rng: np.random.Generator, n: int, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """Two-class logits whose true temperature is ``scale`` (labels drawn from the truth)."""
    z = rng.normal(0.0, 1.5, n)
    y = (rng.random(n) < 1.0 / (1.0 + np.exp(-z))).astype(np.int64)
    return np.stack([np.zeros(n), z * scale], axis=1), y


def test_temperature_is_kept_only_when_it_helps_held_out() -> None:
    from training.operating import halves, temperature

    rng = np.random.default_rng(21)
    groups = [f"p{i}" for i in range(400)]
    z, y = _logits(rng, 400, 4.0)  # overconfident: T of about 4 helps
    t, why = temperature(z, y, halves(y, groups, 0), True)
    assert why["used"] and t > 2.0 and why["heldout_nll_scaled"] < why["heldout_nll_unscaled"]
    z, y = _logits(rng, 400, 1.0)  # calibrated already: held out, a fitted T rarely helps
    t, why = temperature(z, y, halves(y, groups, 0), True)
    assert why["used"] is (why["heldout_nll_scaled"] < why["heldout_nll_unscaled"])
    assert t == 1.0 or why["used"]
    assert temperature(z, y, None, True)[1]["used"] is False  # no split: not tested, not used
    assert temperature(z, y, halves(y, groups, 0), False) == (
        1.0,
        {"used": False, "value": 1.0, "reason": "not requested"},
    )


def test_the_shipped_point_is_cross_fitted_on_the_calibration_split() -> None:
    from training.operating import Target, calibrate

    rng = np.random.default_rng(22)
    z, y = _logits(rng, 120, 1.0)
    groups = [f"p{i // 2}" for i in range(120)]
    cal = calibrate(z, y, groups, high=[1], target=Target(0.9, 0.2, False), seed=0)
    cf = cal.report["cross_fitted"]
    assert cf is not None and cf["referral_rate"]["n"] == 120
    # the bundle records what the shipped band promises on new slides: the upper bound from
    # the split's own scores, never above --max-referral, never below what the split saw
    b = cal.choice.bound
    assert b is not None and cal.referral_rate == b["upper_bound"]
    assert cal.report["validated_referral_rate"]["value"] == cal.referral_rate
    own = cal.report["on_split_with_its_own_thresholds"]["referral_rate"]
    assert own["successes"] == b["slides_in_band"] <= b["max_slides_in_band"]
    assert own["value"] <= cal.referral_rate <= 0.2
    assert cal.choice.thresholds.chosen_on == "validation" and cal.slides == 120
    assert cal.report["temperature"]["used"] is False


def test_thresholds_do_not_depend_on_the_scale_of_the_scores() -> None:
    """A strongly regularised model's p(high) may all lie within 0.01 of 0.5: the thresholds
    must rank slides exactly as on the spread-out scores (an absolute bandwidth floor put the
    decision below every score: all slides called high)."""
    rng = np.random.default_rng(12)
    pos, p = _scores(rng, 60)
    z = np.log(p / (1 - p))
    squeezed = 1.0 / (1.0 + np.exp(-z * 0.005))  # the same order, all within 0.01 of 0.5
    a = choose_thresholds(pos, p, 0.9).thresholds
    b = choose_thresholds(pos, squeezed, 0.9).thresholds
    for x, y in ((a.decision, b.decision), (a.abstain_low, b.abstain_low)):
        assert np.array_equal(p >= x, squeezed >= y)
    assert 0.0 < (squeezed >= b.decision).mean() < 1.0


def test_a_collapsed_shipped_model_is_named() -> None:
    """A final network that gives every calibration slide the same p(high) (seen on one seed of
    the 160-slide set) is flagged, not shipped silently."""
    from training.operating import Target, calibrate

    y = (np.arange(40) % 2).astype(np.int64)
    z = np.tile([[0.0, -0.016]], (40, 1))
    groups = [f"p{i}" for i in range(40)]
    cal = calibrate(z, y, groups, high=[1], target=Target(0.9, 0.2, False), seed=0)
    assert cal.report["collapsed"] is not None and "collapsed" in cal.report["collapsed"]
    separated = np.stack([np.zeros(40), 3.0 * (2 * y - 1) + 0.1 * np.arange(40) / 40], axis=1)
    ok = calibrate(separated, y, groups, high=[1], target=Target(0.9, 0.2, False), seed=0)
    assert ok.report["collapsed"] is None


def _family(name: str, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Validation or new slides' p(high) from one of several score shapes."""
    pos = rng.random(n) < 0.43
    if name == "overlapping":
        z = rng.normal(0.0, 1.0, n) + 1.5 * pos - 0.7
    elif name == "weak":
        z = rng.normal(0.0, 1.0, n) + 0.6 * pos - 0.3
    elif name == "saturating":  # a confident network: most p(high) within 1e-3 of 0 or 1
        z = 6.0 * (rng.normal(0.0, 1.0, n) + 1.5 * pos - 0.7)
    else:  # "skewed": exponential tails, a bunched low class
        z = np.where(pos, 1.0 - rng.exponential(1.0, n), rng.exponential(0.5, n) - 1.0)
    return pos, 1.0 / (1.0 + np.exp(-z))


@pytest.mark.parametrize("family", ["overlapping", "weak", "saturating", "skewed"])
def test_the_referral_bound_holds_on_new_slides_with_the_stated_confidence(family: str) -> None:
    """The band refers at most ``max_referral`` of *new* slides in at least ``confidence`` of
    the validation sets it could have been chosen on, whatever the shape of the scores and
    however small the set.  (Meeting the bound on the validation fit alone exceeds it on new
    slides about half the time: the 32-slide calibration split of a shipped bundle referred
    up to 29 % of 400 new slides with --max-referral 0.2.)"""
    rng = np.random.default_rng(sum(map(ord, family)))
    _, p_new = _family(family, rng, 20000)
    draws, exceeded = 0, 0
    for n in (20, 32, 60):
        for _ in range(50):
            pos, p = _family(family, rng, n)
            c = choose_thresholds(pos, p, 0.9, max_referral=0.2, confidence=0.95)
            th = c.thresholds
            share = float(_referred(p_new, th.abstain_low, th.abstain_high).mean())
            b = c.bound
            assert b is not None
            # only a zero-width band [d, d] may hold more (a validation score equal to d)
            assert b["slides_in_band"] <= b["max_slides_in_band"] or (
                th.abstain_low == th.abstain_high
            )
            draws += 1
            exceeded += share > 0.2
    # 5 % expected; 150 draws: the binomial 99.9 % quantile is 15
    assert exceeded <= 15, f"{exceeded} of {draws} validation sets exceeded the bound"


@pytest.mark.parametrize(("n", "most"), [(10, -1), (16, 0), (32, 2), (88, 11)])
def test_the_band_may_hold_as_many_slides_as_the_beta_bound_allows(n: int, most: int) -> None:
    from scipy.stats import beta

    from training.thresholds import max_slides_in_band

    got = max_slides_in_band(n, 0.2, 0.95)
    assert got == most
    if got >= 0:
        assert beta.ppf(0.95, got + 1, n - got) <= 0.2 < beta.ppf(0.95, got + 2, n - got - 1)


def _split(
    family: str, rng: np.random.Generator, n: int, scale: float
) -> tuple[np.ndarray, np.ndarray]:
    """A model's two-class logits on ``n`` slides (p(high) of ``family``, stretched by
    ``scale``: another network ranks alike on another scale) and their labels."""
    pos, p = _family(family, rng, n)
    z = scale * np.log(p / (1.0 - p))
    return np.stack([np.zeros(n), z], axis=1), pos.astype(np.int64)


def _reference(family: str, rng: np.random.Generator, n: int) -> Any:
    from training.operating import Reference, fold_levels

    pos, p = _family(family, rng, n)
    folds = [(np.arange(0), np.arange(k, n, 3)) for k in range(3)]
    return Reference(pos, fold_levels(p, folds))


def test_the_shipped_thresholds_never_read_the_calibration_labels() -> None:
    """Rank levels come from the out-of-fold slides, the scale from the calibration split's
    scores: relabelling the split changes its figures but not the thresholds (so the figures
    are held out)."""
    from training.operating import Target, calibrate

    rng = np.random.default_rng(5)
    ref = _reference("overlapping", rng, 128)
    z, y = _split("overlapping", rng, 32, 3.0)
    target = Target(0.9, 0.2, False)
    groups = [f"p{i}" for i in range(32)]
    a = calibrate(z, y, groups, high=[1], target=target, seed=0, reference=ref)
    b = calibrate(z, 1 - y, groups, high=[1], target=target, seed=0, reference=ref)
    assert a.choice.thresholds == b.choice.thresholds
    assert a.report["held_out"] == a.report["on_split_with_its_own_thresholds"]
    assert a.report["held_out"]["roc_auc"] != b.report["held_out"]["roc_auc"]
    assert "rank levels" in a.report["method"]
    bound = a.choice.bound
    assert bound is not None and bound["slides_in_band"] <= bound["max_slides_in_band"] == 2
    assert a.referral_rate == bound["upper_bound"] <= 0.2


@pytest.mark.parametrize("family", ["overlapping", "weak", "skewed"])
def test_shipped_thresholds_miss_the_target_less_than_the_split_alone(family: str) -> None:
    """On 32 calibration slides (about 14 high-risk) the decision threshold read off the
    split's own high-risk scores swings with one or two slides (a shipped model reached 8.5 %
    specificity on new slides at AUC 0.95); rank levels from 128 out-of-fold slides, read off
    at the split's percentiles, keep sensitivity on new slides near the target and refer at
    most --max-referral with the stated confidence, whatever the model's scale."""
    from training.operating import Target, calibrate

    rng = np.random.default_rng(sum(map(ord, family)) + 1)
    target = Target(0.9, 0.2, False)
    groups = [f"p{i}" for i in range(32)]
    z_new, y_new = _split(family, rng, 5000, 3.0)
    p_new = 1.0 / (1.0 + np.exp(-z_new[:, 1]))
    pos_new = y_new == 1
    sens: dict[str, list[float]] = {"transferred": [], "split": []}
    exceeded = 0
    for _ in range(50):
        ref = _reference(family, rng, 128)
        z, y = _split(family, rng, 32, 3.0)
        for name, r in (("transferred", ref), ("split", None)):
            th = calibrate(z, y, groups, high=[1], target=target, seed=0, reference=r)
            d = th.choice.thresholds
            sens[name].append(float((p_new[pos_new] >= d.decision).mean()))
            if r is not None:
                exceeded += float(_referred(p_new, d.abstain_low, d.abstain_high).mean()) > 0.2
    low = {k: float(np.percentile(v, 10)) for k, v in sens.items()}  # the bad draws
    assert low["transferred"] > low["split"], low
    assert abs(float(np.mean(sens["transferred"])) - 0.9) < 0.05, np.mean(sens["transferred"])
    assert exceeded <= 7, exceeded  # 5 % of 50 expected; binomial 99.9 % quantile 7
