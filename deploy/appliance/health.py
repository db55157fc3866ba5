"""The health file a supervisor can query, and the OTA health period's judgement of a model.

``<state-dir>/run/health.json``:
The daemon rewrites it atomically every ``service.health_interval_s``.  ``omis serve --health``
(:func:`check_health`) reports healthy when the file is fresh (younger than three intervals),
its process is alive and its state is not ``error``.  Freshness is measured on the boot clock
(:mod:`deploy.appliance.uptime`), never the wall clock: a step back of the date must not make a
hung daemon look healthy.

:class:`HealthJudge`: whether a new model's referral and no-usable-field rates during its
health period are significantly above the rates its bundle was validated at (see below and
docs/ota.md).
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deploy.appliance import uptime
from firmware_bridge.fsutil import atomic_write_text, pid_alive
from inference.bundle import Bundle

HEALTH_FILE = Path("run") / "health.json"
STALE_FACTOR = 3.0


def health_path(state_dir: Path) -> Path:
    """Where the health file of ``state_dir`` lives."""
    return state_dir / HEALTH_FILE


def write_health(state_dir: Path, report: dict[str, Any]) -> None:
    """Write the health report atomically, stamped with pid and time."""
    # ``at`` (wall time) is for people; freshness is judged on the boot clock.
    body = dict(report, pid=os.getpid(), at=time.time(), **uptime.stamp())
    atomic_write_text(health_path(state_dir), json.dumps(body, sort_keys=True, allow_nan=False))


def check_health(state_dir: Path, interval_s: float, now: float | None = None) -> tuple[bool, str]:
    """``(healthy, one-line reason)`` from the health file (``now``: boot-clock seconds)."""
    path = health_path(state_dir)
    try:
        report = json.loads(path.read_text("utf-8"))
        if not isinstance(report, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as exc:
        return False, f"no readable health file at {path}: {exc}"
    age = uptime.age_s(report, now)
    if age is None:
        return False, "health file is stale (written in another boot, or without a clock stamp)"
    # The boot clock never goes back: a stamp "from the future" is a faked or foreign clock.
    if age < 0 or age > STALE_FACTOR * interval_s:
        return False, f"health file is stale ({age:.0f} s old)"
    if not pid_alive(int(report.get("pid", 0))):
        return False, f"process {report.get('pid')} is not running"
    state = report.get("state")
    if state == "error":
        return False, f"state error: {report.get('last_error')}"
    return True, (
        f"state {state}, mqtt {'connected' if report.get('connected') else 'disconnected'}, "
        f"outbox {report.get('outbox_rows')} row(s)"
    )


# -- the OTA health period's judgement of a new model ------------------------------------------
#
# A model refers (abstains on) a share of slides by design: the share its bundle records as
# validated (``training.operating_point``).  A fixed cap on abstentions rolls a healthy model
# back by chance (two referrals in a row are likely at a 20-40 % referral rate), so the health
# period asks instead whether the observed rate is *significantly* above the validated one: an
# exact one-sided binomial test, repeated after every slide, at HEALTH_SIGNIFICANCE.

HEALTH_SIGNIFICANCE = 0.01
DEFAULT_REFERRAL_RATE = 0.2  # a bundle that records none: the training default --max-referral
DEFAULT_NO_USABLE_FIELD_RATE = 0.05  # a bundle that records none


def binomial_tail(k: int, n: int, p: float) -> float:
    """P(X >= k) for X ~ Binomial(n, p), exact (n is a health period's slide count: small)."""
    if k <= 0:
        return 1.0
    if k > n:
        return 0.0
    p = min(max(p, 0.0), 1.0)
    return float(
        min(1.0, sum(math.comb(n, i) * p**i * (1.0 - p) ** (n - i) for i in range(k, n + 1)))
    )


@dataclass(frozen=True)
class ValidatedRates:
    """What a bundle was validated at: the baselines of the health period's tests."""

    referral: float = DEFAULT_REFERRAL_RATE
    no_usable_field: float = DEFAULT_NO_USABLE_FIELD_RATE
    recorded: bool = False

    @classmethod
    def of(cls, bundle: Bundle) -> ValidatedRates:
        """The rates ``bundle`` records (``training.operating_point``), else the defaults.

        A rate of zero measured on n slides is taken as ``0.5 / n`` (half a slide): a single
        referral is then not proof of a fault on its own.
        """
        op = bundle.manifest.training.operating_point
        if op is None:
            return cls()
        floor = 0.5 / max(op.slides, 1)
        return cls(max(op.referral_rate, floor), max(op.no_usable_field_rate, floor), True)


@dataclass
class HealthJudge:
    """Counts a health period's slides; says when a rate is significantly above its baseline.

    ``referral``: slides the model abstained on, out of the slides that reached it.
    ``no_usable_field``: slides on which no field passed QC, out of all judged slides; counted
    against the model only when its bundle changed the QC thresholds (``qc_changed``): with the
    same QC a dark camera or an empty slide is the hardware's fault, not the model's.
    """

    rates: ValidatedRates
    qc_changed: bool
    significance: float = HEALTH_SIGNIFICANCE
    reached: int = 0  # slides the model classified or referred
    referred: int = 0
    unusable: int = 0

    def record(self, verdict: str) -> str | None:
        """Count one slide (``ok``, ``abstained``, ``no_usable_field``); a reason to roll back
        when a rate is now significantly above its validated value, else None."""
        if verdict == "no_usable_field":
            if not self.qc_changed:
                return None
            self.unusable += 1
            return self._test(
                "no usable field", self.unusable, self.judged, self.rates.no_usable_field
            )
        self.reached += 1
        if verdict == "abstained":
            self.referred += 1
            return self._test("referred", self.referred, self.reached, self.rates.referral)
        return None

    @property
    def judged(self) -> int:
        """Every slide that counts: reached the model, or had no usable field under new QC."""
        return self.reached + self.unusable

    def _test(self, what: str, k: int, n: int, p0: float) -> str | None:
        p = binomial_tail(k, n, p0)
        if p >= self.significance:
            return None
        origin = "validated" if self.rates.recorded else "default"
        return (
            f"{what} on {k} of {n} slides, significantly above the {origin} rate {p0:.1%} "
            f"(exact binomial p = {p:.2g} < {self.significance:g})"
        )
