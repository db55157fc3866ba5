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
* the referral bound ``max_referral`` (``--max-referral``, default 0.2) must hold *on new
  slides*, not just on the slides the band was chosen on.  Two conditions, both must hold:

  - the share of slides the band refers under the smoothed fit (validation prevalence) is at
    most ``max_referral``;
  - the band holds at most ``m`` of the ``n`` validation slides, where ``m`` is the largest
    count for which the referral rate on new slides stays at most ``max_referral`` with
    probability ``confidence`` (``--referral-confidence``, default 0.95).  The probability
    mass between the two validation scores just outside a band that holds ``k`` of ``n``
    scores follows Beta(k + 1, n - k) for exchangeable slides (order statistics of a
    continuous distribution), so ``m`` is the largest ``k`` with that Beta's ``confidence``
    quantile at most ``max_referral`` (:func:`max_slides_in_band`).  On 32 validation slides
    that allows 2 (about 9 % referral expected), on 88 it allows 11 (about 13 %): small
    validation sets buy a bounded referral rate with a narrower band.

  When the ideal band breaks either condition it is narrowed towards ``d`` (both edges by the
  same fraction of their distance, on the logit scale) until both hold, and
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
from scipy.optimize import brentq, minimize_scalar
from scipy.special import log_softmax, ndtr
from scipy.stats import beta

from inference.bundle import Thresholds

F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]
B = npt.NDArray[np.bool_]

BAND_SENSITIVITY = 0.98
BAND_SPECIFICITY = 0.98
DEFAULT_MAX_REFERRAL = 0.2
DEFAULT_REFERRAL_CONFIDENCE = 0.95
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
    bound: dict[str, object] | None = field(default=None)

    def to_json(self) -> dict[str, object]:
        """JSON object for the report."""
        return {
            **self.thresholds.model_dump(mode="json"),
            "n_validation": self.n_validation,
            "problem": self.problem,
            "expected_on_validation_fit": self.expected,
            "referral_bound": self.bound,
        }


def max_slides_in_band(n: int, max_referral: float, confidence: float) -> int:
    """The most of ``n`` validation slides a band may hold (-1: none, not even a tie at d).

    A band holding ``k`` of ``n`` exchangeable validation scores refers new slides at a rate of
    at most the mass between the two scores just outside it, distributed Beta(k + 1, n - k);
    the answer is the largest ``k`` whose Beta ``confidence`` quantile is at most
    ``max_referral``.
    """
    if max_referral >= 1.0:
        return n
    best = -1
    for k in range(n):
        if float(beta.ppf(confidence, k + 1, n - k)) > max_referral:
            break
        best = k
    return best


def referral_upper_bound(k: int, n: int, confidence: float) -> float:
    """Upper ``confidence`` bound on the referral rate of a band holding ``k`` of ``n`` slides."""
    if n <= 0 or k >= n:
        return 1.0
    return float(beta.ppf(confidence, k + 1, n - k))


def logit_scores(p: F64) -> F64:
    q = np.clip(np.asarray(p, dtype=np.float64), 1e-300, 1.0)
    r = np.clip(1.0 - np.asarray(p, dtype=np.float64), 1e-300, 1.0)
    out: F64 = np.clip(np.log(q) - np.log(r), -LOGIT_CLIP, LOGIT_CLIP)
    return out


def sigmoid(t: float) -> float:
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
        """The t with ``cdf(t) == q`` (Brent's method; the cdf is continuous and increasing),
        clamped to ten bandwidths beyond the extreme scores."""
        lo = float(self.x.min()) - 10.0 * self.h
        hi = float(self.x.max()) + 10.0 * self.h
        if self.cdf(lo) >= q:
            return lo
        if self.cdf(hi) <= q:
            return hi
        return float(brentq(lambda t: self.cdf(t) - q, lo, hi, xtol=1e-12, rtol=1e-15))


def bisect_increasing(f: Callable[[float], float], lo: float, hi: float) -> float:
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


def _inside(p: F64, lo: float, hi: float) -> int:
    """Validation slides the device would refer with the band [sigmoid(lo), sigmoid(hi)]."""
    return int(((p >= sigmoid(lo)) & (p <= sigmoid(hi))).sum())


def _narrowed(
    fit: _Fit, p: F64, band_edges: tuple[float, float, float], *, cap: float, most: int
) -> tuple[float, float]:
    """Shrink [lo, hi] towards d by one common factor until both referral conditions hold."""
    lo, d, hi = band_edges

    def band(a: float) -> tuple[float, float]:
        return d - a * (d - lo), d + a * (hi - d)

    def excess(a: float) -> float:  # < 0 exactly when both hold; non-decreasing in a
        b = band(a)
        return max(fit.referral(*b) - cap, (_inside(p, *b) - most) - 0.5)

    return band(bisect_increasing(excess, 0.0, 1.0))


def choose_thresholds(
    positive: B,
    p_high: F64,
    target_sensitivity: float,
    temperature: float = 1.0,
    *,
    max_referral: float = DEFAULT_MAX_REFERRAL,
    confidence: float = DEFAULT_REFERRAL_CONFIDENCE,
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
    z = logit_scores(p_high)
    floor = BANDWIDTH_FLOOR * float(np.std(z))
    fit = _Fit(Smoothed.fit(z[pos], floor), Smoothed.fit(z[~pos], floor), float(pos.mean()))
    d = fit.high.quantile(1.0 - target_sensitivity)
    lo = min(fit.high.quantile(1.0 - BAND_SENSITIVITY), d)
    hi = max(fit.low.quantile(BAND_SPECIFICITY), d)
    problem = None
    p = np.asarray(p_high, dtype=np.float64)
    most = max_slides_in_band(n, max_referral, confidence)
    ideal, ideal_in = fit.referral(lo, hi), _inside(p, lo, hi)
    if ideal > max_referral or ideal_in > most:
        lo, hi = _narrowed(fit, p, (lo, d, hi), cap=max_referral, most=most)
        problem = (
            f"the band holding {BAND_SENSITIVITY:.0%} of high-risk and {BAND_SPECIFICITY:.0%} of "
            f"low-risk validation slides outside it would refer {ideal:.1%} of slides on the "
            f"smoothed fit and holds {ideal_in} of {n} validation slides; --max-referral "
            f"{max_referral:g} at confidence {confidence:g} allows at most {max(most, 0)} of "
            f"{n}: narrowed to hold {_inside(p, lo, hi)} (decided slides then carry more errors)"
        )
    p_lo, p_d, p_hi = sigmoid(lo), sigmoid(d), sigmoid(hi)
    th = Thresholds(
        decision=p_d,
        abstain_low=min(p_lo, p_d),
        abstain_high=max(p_hi, p_d),
        chosen_on="validation",
        target_sensitivity=target_sensitivity,
        temperature=temperature,
    )
    k = _inside(p, lo, hi)
    if most < 0 < max_referral and problem is not None:
        problem = (
            f"{n} validation slides are too few to keep any band's referral rate within "
            f"--max-referral {max_referral:g} at confidence {confidence:g}: no band (a plain "
            "decision)"
        )
    bound: dict[str, object] = {
        "max_referral": max_referral,
        "confidence": confidence,
        "max_slides_in_band": max(most, 0),
        "slides_in_band": k,
        "slides": n,
        # a zero-width band [d, d] refers no new slide (scores are continuous)
        "upper_bound": 0.0 if lo == hi else referral_upper_bound(k, n, confidence),
    }
    return Choice(th, n, problem, fit.expected(lo, d, hi), bound)


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
