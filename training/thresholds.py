"""Decision threshold, abstain band and temperature, chosen on validation data only.

For each cross-validation fold the network's predictions on that fold's inner validation
slides (patients held out of its training, never its test slides) give the thresholds on
p(high).  Validation sets are small (a fold of the 160-slide set holds about nine high-risk
validation slides), so the thresholds are read off a *smoothed* score distribution rather than
off the extreme empirical scores: each class's scores, on the logit scale, are smoothed with a
Gaussian kernel (Silverman's bandwidth, floored at a twentieth of the SD of all the scores),
giving continuous class-conditional
distribution functions ``F_high`` and ``F_low`` (a smoothed ROC curve).  Then:

* the decision threshold ``d``: ``F_high(d) = 1 - target`` (the smoothed curve reaches the
  target sensitivity);
* the abstain band: ideally from ``lo``, where ``BAND_SENSITIVITY`` of the high-risk slides lie
  above, to ``hi``, where ``BAND_SPECIFICITY`` of the low-risk ones lie below (outside it both
  errors were rare), widened to contain ``d``;
* the referral bound: the share of slides the band refers, under the smoothed fit and the
  validation prevalence, must not exceed ``max_referral`` (``--max-referral``, default 0.2).
  When the ideal band refers more, it is narrowed towards ``d`` (both edges by the same
  fraction of their distance, on the logit scale) until it refers exactly ``max_referral``, and
  :attr:`Choice.problem` says that the band's error targets and the referral bound cannot be
  met together.  The sensitivity target is still met with referrals counted as human reviews
  (``lo <= d``).

The fold's thresholds score its test slides; the shipped model's come from validation
predictions it never trained on (see :mod:`training.pipeline`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax, ndtr

from inference.bundle import Thresholds

F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]
B = npt.NDArray[np.bool_]

BAND_SENSITIVITY = 0.98
BAND_SPECIFICITY = 0.98
DEFAULT_MAX_REFERRAL = 0.2
LOGIT_CLIP = 30.0  # p(high) of exactly 0 or 1 (float saturation) maps to a finite logit
# Floor of a class's bandwidth, as a fraction of the SD of all validation scores (both classes):
# a class with identical scores still has a spread, and the floor scales with the scores (a
# strongly regularised model's p(high) may all lie within 0.01 of 0.5).
BANDWIDTH_FLOOR = 0.05
MIN_BANDWIDTH = 1e-9
BISECT_STEPS = 80


@dataclass(frozen=True)
class Choice:
    """Thresholds chosen on one set of validation predictions, or why none could be."""

    thresholds: Thresholds
    n_validation: int
    problem: str | None = None
    expected: dict[str, float] | None = field(default=None)

    def to_json(self) -> dict[str, object]:
        """JSON object for the report."""
        return {
            **self.thresholds.model_dump(mode="json"),
            "n_validation": self.n_validation,
            "problem": self.problem,
            "expected_on_validation_fit": self.expected,
        }


def _logit(p: F64) -> F64:
    q = np.clip(np.asarray(p, dtype=np.float64), 1e-300, 1.0)
    r = np.clip(1.0 - np.asarray(p, dtype=np.float64), 1e-300, 1.0)
    out: F64 = np.clip(np.log(q) - np.log(r), -LOGIT_CLIP, LOGIT_CLIP)
    return out


def _sigmoid(t: float) -> float:
    return float(1.0 / (1.0 + math.exp(-t)))


@dataclass(frozen=True)
class Smoothed:
    """A Gaussian-kernel-smoothed distribution of one class's logit scores."""

    x: F64
    h: float

    @classmethod
    def fit(cls, x: F64, floor: float) -> Smoothed:
        """Silverman's rule-of-thumb bandwidth, at least ``floor`` (tiny or tied samples)."""
        x = np.asarray(x, dtype=np.float64)
        sd = float(np.std(x, ddof=1)) if x.size > 1 else 0.0
        iqr = float(np.subtract(*np.percentile(x, [75, 25]))) / 1.349 if x.size > 1 else 0.0
        spread = min(sd, iqr) if iqr > 0 else sd
        h = 0.9 * spread * x.size ** (-0.2) if spread > 0 else 0.0
        return cls(x, max(h, floor, MIN_BANDWIDTH))

    def cdf(self, t: float) -> float:
        """P(score <= t) under the smoothed fit."""
        return float(np.mean(ndtr((t - self.x) / self.h)))

    def quantile(self, q: float) -> float:
        """The t with ``cdf(t) == q`` (bisection; the cdf is continuous and increasing)."""
        lo = float(self.x.min()) - 10.0 * self.h
        hi = float(self.x.max()) + 10.0 * self.h
        return _bisect(lambda t: self.cdf(t) - q, lo, hi)


def _bisect(f: Callable[[float], float], lo: float, hi: float) -> float:
    """Root of an increasing ``f`` on [lo, hi] (clamped to the ends)."""
    if f(lo) >= 0:
        return lo
    if f(hi) <= 0:
        return hi
    for _ in range(BISECT_STEPS):
        mid = 0.5 * (lo + hi)
        if f(mid) < 0:
            lo = mid
        else:
            hi = mid
    return lo  # f(lo) < 0: a referral bound found this way is never exceeded


@dataclass(frozen=True)
class _Fit:
    high: Smoothed
    low: Smoothed
    prevalence: float

    def referral(self, lo: float, hi: float) -> float:
        """Expected share of slides with a logit score in [lo, hi]."""
        a = self.high.cdf(hi) - self.high.cdf(lo)
        b = self.low.cdf(hi) - self.low.cdf(lo)
        return self.prevalence * a + (1.0 - self.prevalence) * b

    def expected(self, lo: float, d: float, hi: float) -> dict[str, float]:
        """Figures the smoothed fit expects at (lo, d, hi)."""
        hi_above = 1.0 - self.high.cdf(hi)
        hi_below = self.high.cdf(lo)
        lo_below = self.low.cdf(lo)
        lo_above = 1.0 - self.low.cdf(hi)
        return {
            "referral_rate": self.referral(lo, hi),
            "sensitivity_at_decision": 1.0 - self.high.cdf(d),
            "sensitivity_with_review": 1.0 - hi_below,
            "specificity_with_review": 1.0 - lo_above,
            "sensitivity_decided": hi_above / max(hi_above + hi_below, 1e-300),
            "specificity_decided": lo_below / max(lo_below + lo_above, 1e-300),
        }


def _narrowed(fit: _Fit, lo: float, d: float, hi: float, cap: float) -> tuple[float, float]:
    """Shrink [lo, hi] towards d by one common factor until it refers ``cap``."""

    def band(a: float) -> tuple[float, float]:
        return d - a * (d - lo), d + a * (hi - d)

    return band(_bisect(lambda a: fit.referral(*band(a)) - cap, 0.0, 1.0))


def choose_thresholds(
    positive: B,
    p_high: F64,
    target_sensitivity: float,
    temperature: float = 1.0,
    *,
    max_referral: float = DEFAULT_MAX_REFERRAL,
) -> Choice:
    """Decision threshold and abstain band from validation predictions (see the module doc)."""
    pos = np.asarray(positive, dtype=bool)
    n = int(pos.size)
    if not pos.any() or pos.all():
        return Choice(
            Thresholds(target_sensitivity=target_sensitivity, temperature=temperature),
            n,
            "validation data hold one risk class only: defaults kept",
        )
    z = _logit(p_high)
    floor = BANDWIDTH_FLOOR * float(np.std(z))
    fit = _Fit(Smoothed.fit(z[pos], floor), Smoothed.fit(z[~pos], floor), float(pos.mean()))
    d = fit.high.quantile(1.0 - target_sensitivity)
    lo = min(fit.high.quantile(1.0 - BAND_SENSITIVITY), d)
    hi = max(fit.low.quantile(BAND_SPECIFICITY), d)
    problem = None
    ideal = fit.referral(lo, hi)
    if ideal > max_referral:
        lo, hi = _narrowed(fit, lo, d, hi, max_referral)
        problem = (
            f"the band holding {BAND_SENSITIVITY:.0%} of high-risk and {BAND_SPECIFICITY:.0%} of "
            f"low-risk validation slides outside it would refer {ideal:.1%} of slides, above "
            f"--max-referral {max_referral:g}: narrowed to refer {max_referral:.1%} (decided "
            "slides then carry more errors)"
        )
    p_lo, p_d, p_hi = _sigmoid(lo), _sigmoid(d), _sigmoid(hi)
    th = Thresholds(
        decision=p_d,
        abstain_low=min(p_lo, p_d),
        abstain_high=max(p_hi, p_d),
        chosen_on="validation",
        target_sensitivity=target_sensitivity,
        temperature=temperature,
    )
    return Choice(th, n, problem, fit.expected(lo, d, hi))


def fit_temperature(logits: F64, labels: I64) -> float:
    """The softmax temperature minimising the negative log-likelihood of ``labels``."""
    z = np.asarray(logits, dtype=np.float64)
    y = np.asarray(labels, dtype=np.int64)
    if y.size == 0:
        return 1.0

    def nll(log_t: float) -> float:
        return float(-log_softmax(z / math.exp(log_t), axis=1)[np.arange(y.size), y].mean())

    res = minimize_scalar(nll, bounds=(-3.0, 3.0), method="bounded")
    return float(math.exp(float(res.x)))


def softmax_t(logits: F64, temperature: float) -> F64:
    """Softmax of ``logits / temperature``."""
    out: F64 = np.exp(log_softmax(np.asarray(logits, dtype=np.float64) / temperature, axis=1))
    return out
