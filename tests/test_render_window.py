"""The render window keeps every class's spectral mass; the device's out-of-range check."""

from __future__ import annotations

import numpy as np
import pytest

from inference.exceptions import SpectrumInputError
from inference.render import (
    RenderParams,
    fit_x_range,
    mass_outside_fraction,
    out_of_range,
)
from training.window import fit_render_window, render_coverage

X = -144.5 + np.arange(290, dtype=np.float64)


def _bump(centre: float, width: float, height: float) -> np.ndarray:
    u = (X - centre) / width
    return height * np.where(np.abs(u) < 1.0, (1.0 - u * u) ** 2, 0.0)


def _two_classes(n: int = 20) -> tuple[np.ndarray, np.ndarray]:
    """Low risk: one main peak.  High risk: the same plus a small tail at -45..-10 nm."""
    rng = np.random.default_rng(0)
    main = [_bump(0.0, 12.0, 20.0) + rng.normal(0, 0.05, X.size) for _ in range(n)]
    tail = [m + _bump(-28.0, 17.0, 1.5) for m in main]
    return np.stack(main + tail), np.repeat(np.array([0, 1], dtype=np.int64), n)


def test_window_keeps_99_percent_of_every_class_mass() -> None:
    ys, labels = _two_classes()
    window = fit_render_window(X, ys, labels)
    cov = render_coverage(X, ys, labels, ("low", "high"), RenderParams(x_range_nm=window))
    assert cov["low"] is not None and cov["high"] is not None
    assert cov["low"] >= 0.99 and cov["high"] >= 0.99
    assert window[0] <= -40.0  # the high-risk tail is inside


def test_the_old_label_free_window_cut_the_high_risk_tail() -> None:
    """The defect: fitted on where most mass lies, the window dropped the minority's tail."""
    ys, labels = _two_classes()
    old = fit_x_range(X, ys)
    cov = render_coverage(X, ys, labels, ("low", "high"), RenderParams(x_range_nm=old))
    new = fit_render_window(X, ys, labels)
    cov_new = render_coverage(X, ys, labels, ("low", "high"), RenderParams(x_range_nm=new))
    assert cov_new["high"] is not None and cov_new["high"] >= 0.99
    assert cov["high"] is not None and cov["high"] < cov_new["high"]


def test_mass_outside_fraction() -> None:
    y = np.zeros(X.size)
    y[(X > -10) & (X < 10)] = 1.0
    y[X < -140] = -1.0  # negative mass counts by its magnitude
    inside = float(((X > -10) & (X < 10)).sum())
    outside = float((X < -140).sum())
    params = RenderParams(x_range_nm=(-20.0, 20.0))
    assert mass_outside_fraction(X, y, params) == pytest.approx(outside / (inside + outside))
    assert mass_outside_fraction(X, y, RenderParams()) == 0.0  # no window: whole axis
    assert mass_outside_fraction(X, np.zeros(X.size), params) == 0.0
    frac, flagged = out_of_range(X, y, params, 0.5)
    assert not flagged and frac < 0.5
    assert out_of_range(X, y, params, 0.01)[1]
    assert not out_of_range(X, y, params, None)[1]


def test_mass_outside_rejects_bad_input() -> None:
    with pytest.raises(SpectrumInputError, match="non-finite"):
        mass_outside_fraction(X, np.full(X.size, np.nan), RenderParams(x_range_nm=(-1.0, 1.0)))
