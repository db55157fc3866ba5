"""Performance in service: the device's calls against the lab's verdicts, and drift.

For each model version (``model_name``, ``model_version``) among the matching results:

* ``confusion`` ``{tp, fn, tn, fp}`` -- classified results with a satisfactory verdict of
  their own (the result's latest review); positive = high risk (Bethesda ASC-H, HSIL, AGC,
  AIS, SCC, adenocarcinoma), called positive when the result's ``risk`` is ``high``;
* ``sensitivity`` = tp / (tp + fn), ``specificity`` = tn / (tn + fp), Wilson 95 % intervals;
* ``referral_rate`` (abstained), ``qc_failure_rate`` (no field passed QC, or failed at the QC
  stage) and ``out_of_range_rate`` (abstained as out of range) over every result that is not
  cancelled, reviewed or not;
* ``drift`` against the bundle's ``training.metrics.reference_distribution``: the population
  stability index (PSI) of the p(high) histogram and the shift of the mean spectral centroid in
  units of the training slides' standard deviation;
* ``over_time``: the same figures per UTC day, for the dashboard's charts.

Alerts (docs/collector.md): an observed sensitivity or specificity significantly *below* the
bundle's validated one, or a referral rate significantly *above* it -- one-sided exact binomial
test at level ``alpha`` (default 0.01), only with at least ``min_n`` slides in the denominator --
and drift past ``psi_limit`` (default 0.25, the usual "significant shift" rule of thumb) or a
centroid shift past ``centroid_limit_sd`` (default 1.0 SD).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from statistics import NormalDist
from typing import Any

from sqlalchemy import Connection, Engine, insert, select, update

from deploy.collector.queries import rfc3339
from deploy.collector.store import utcnow
from deploy.collector.tables import alerts, results
from deploy.collector.verdicts import RESULT_COLUMNS, Verdict, latest_verdicts, spectrum_of
from deploy.exceptions import ConfigError

log = logging.getLogger(__name__)

ALL_DEVICES = "*"
PSI_EPS = 1e-4


@dataclass(frozen=True)
class Limits:
    """When an alert fires."""

    alpha: float = 0.01
    min_n: int = 20
    psi_limit: float = 0.25
    centroid_limit_sd: float = 1.0


@dataclass(frozen=True)
class Baseline:
    """What a bundle was validated at: rates, the p(high) histogram, the spectral centroid."""

    name: str
    version: int
    sha256: str
    rates: dict[str, float | None]
    edges: list[float]
    counts: list[int]
    centroid: dict[str, float] | None

    def to_json(self) -> dict[str, Any]:
        """The validated figures, as the API shows them."""
        return {
            "rates": self.rates,
            "p_high": {"edges": self.edges, "counts": self.counts},
            "spectral_centroid_nm": self.centroid,
        }


@dataclass(frozen=True)
class PerformanceQuery:
    """The filters of ``GET /api/performance``."""

    model: str | None = None
    version: int | None = None
    device: str | None = None
    since: datetime | None = None
    until: datetime | None = None


def load_baseline(bundle: Path) -> Baseline:
    """The reference distribution recorded in ``bundle/manifest.json``."""
    path = bundle / "manifest.json" if bundle.is_dir() else bundle
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        metrics = manifest.get("training", {}).get("metrics", {})
        ref = metrics["reference_distribution"]
        return Baseline(
            name=str(manifest["name"]),
            version=int(manifest["version"]),
            sha256=str(manifest.get("files", {}).get("model.onnx", {}).get("sha256", "")),
            rates=dict(ref.get("rates", {})),
            edges=[float(e) for e in ref["p_high"]["edges"]],
            counts=[int(c) for c in ref["p_high"]["counts"]],
            centroid=ref.get("spectral_centroid_nm"),
        )
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ConfigError(
            f"performance.bundles: {bundle}: no reference distribution in its manifest ({exc}); "
            "bundles trained by this version of omis train record one"
        ) from exc


def load_baselines(paths: Iterable[Path]) -> dict[tuple[str, int], Baseline]:
    """Baselines keyed by (model name, version)."""
    out = {}
    for path in paths:
        b = load_baseline(Path(path))
        out[(b.name, b.version)] = b
    return out


# --- statistics --------------------------------------------------------------------------------


def wilson(successes: int, n: int, confidence: float = 0.95) -> list[float] | None:
    """Wilson score interval (as statsmodels' ``proportion_confint(method="wilson")``)."""
    if n <= 0:
        return None
    z = NormalDist().inv_cdf(1.0 - (1.0 - confidence) / 2.0)
    p = successes / n
    denom = 1.0 + z * z / n
    centre = (p + z * z / (2.0 * n)) / denom
    half = z * math.sqrt(p * (1.0 - p) / n + z * z / (4.0 * n * n)) / denom
    return [min(p, max(0.0, centre - half)), max(p, min(1.0, centre + half))]


def proportion(successes: int, n: int) -> dict[str, Any]:
    """``{value, ci95, successes, n}`` (value and interval null when n is 0)."""
    value = successes / n if n else None
    return {"value": value, "ci95": wilson(successes, n), "successes": successes, "n": n}


def binom_cdf(k: int, n: int, p: float) -> float:
    """P(X <= k) for X ~ Binomial(n, p), summed in log space."""
    if k < 0:
        return 0.0
    if k >= n:
        return 1.0
    if p <= 0.0:
        return 1.0
    if p >= 1.0:
        return 0.0
    lp, lq = math.log(p), math.log1p(-p)
    total = 0.0
    for i in range(k + 1):
        log_term = math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1)
        total += math.exp(log_term + i * lp + (n - i) * lq)
    return min(1.0, total)


def worse_p_value(observed: dict[str, Any], validated: float, lower_is_worse: bool) -> float:
    """One-sided exact binomial p-value of "worse than ``validated``"."""
    k, n = int(observed["successes"]), int(observed["n"])
    if lower_is_worse:
        return binom_cdf(k, n, validated)
    return 1.0 - binom_cdf(k - 1, n, validated)


def psi(expected: Sequence[int], observed: Sequence[int]) -> float | None:
    """Population stability index of two histograms on the same bins (None when one is empty)."""
    e_total, o_total = sum(expected), sum(observed)
    if e_total == 0 or o_total == 0:
        return None
    total = 0.0
    for e, o in zip(expected, observed, strict=True):
        pe, po = max(e / e_total, PSI_EPS), max(o / o_total, PSI_EPS)
        total += (po - pe) * math.log(po / pe)
    return total


def histogram(values: Sequence[float], edges: Sequence[float]) -> list[int]:
    """Counts of ``values`` in the bins of ``edges`` (the last bin closed, like numpy)."""
    counts = [0] * (len(edges) - 1)
    for v in values:
        for i in range(len(counts)):
            last = i == len(counts) - 1
            if edges[i] <= v < edges[i + 1] or (last and v == edges[-1]):
                counts[i] += 1
                break
    return counts


def centroid(axis: Sequence[float], values: Sequence[float]) -> float | None:
    """Centre of mass of |y| along the spectral axis (training/study.py's definition)."""
    weights = [abs(v) for v in values]
    total = sum(weights)
    return sum(x * w for x, w in zip(axis, weights, strict=True)) / total if total > 0 else None


# --- figures ---------------------------------------------------------------------------------


@dataclass
class _Tally:
    """Counts of one model version (or one day of it)."""

    n: int = 0
    abstained: int = 0
    failed: int = 0
    qc_failed: int = 0
    out_of_range: int = 0
    reviewed: int = 0
    tp: int = 0
    fn: int = 0
    tn: int = 0
    fp: int = 0
    p_high: list[float] = field(default_factory=list)
    centroids: list[float] = field(default_factory=list)

    def add(self, row: Any, verdict: Verdict | None) -> None:
        self.n += 1
        qc = (row.outcome == "abstained" and row.outcome_reason == "no_usable_field") or (
            row.outcome == "failed" and row.outcome_stage == "qc"
        )
        self.abstained += row.outcome == "abstained"
        self.failed += row.outcome == "failed"
        self.qc_failed += qc
        self.out_of_range += row.outcome == "abstained" and row.outcome_reason == "out_of_range"
        if row.p_high is not None and row.outcome in ("classified", "abstained"):
            self.p_high.append(float(row.p_high))
        if verdict is None or not verdict.satisfactory:
            return
        self.reviewed += 1
        if row.outcome != "classified" or row.risk not in ("high", "low"):
            return
        truth, call = verdict.risk == "high", row.risk == "high"
        self.tp += truth and call
        self.fn += truth and not call
        self.tn += not truth and not call
        self.fp += not truth and call

    def figures(self) -> dict[str, Any]:
        mean = sum(self.p_high) / len(self.p_high) if self.p_high else None
        return {
            "counts": {
                "results": self.n,
                "reviewed": self.reviewed,
                "abstained": self.abstained,
                "failed": self.failed,
            },
            "confusion": {"tp": self.tp, "fn": self.fn, "tn": self.tn, "fp": self.fp},
            "sensitivity": proportion(self.tp, self.tp + self.fn),
            "specificity": proportion(self.tn, self.tn + self.fp),
            "referral_rate": proportion(self.abstained, self.n),
            "qc_failure_rate": proportion(self.qc_failed, self.n),
            "out_of_range_rate": proportion(self.out_of_range, self.n),
            "p_high_mean": mean,
        }


def _drift(tally: _Tally, baseline: Baseline | None, limits: Limits) -> dict[str, Any] | None:
    if baseline is None:
        return None
    observed = histogram(tally.p_high, baseline.edges)
    out: dict[str, Any] = {
        "p_high": {
            "edges": baseline.edges,
            "observed": observed,
            "validated": baseline.counts,
            "psi": psi(baseline.counts, observed),
            "limit": limits.psi_limit,
        },
        "spectral_centroid": None,
    }
    c = baseline.centroid
    if c and tally.centroids:
        mean = sum(tally.centroids) / len(tally.centroids)
        shift = mean - float(c["mean"])
        sd = float(c.get("sd") or 0.0)
        out["spectral_centroid"] = {
            "observed_mean_nm": mean,
            "validated_mean_nm": float(c["mean"]),
            "validated_sd_nm": sd,
            "shift_nm": shift,
            "shift_sd": shift / sd if sd > 0 else None,
            "n": len(tally.centroids),
            "limit_sd": limits.centroid_limit_sd,
        }
    return out


def _findings(
    figures: dict[str, Any], drift: dict[str, Any] | None, baseline: Baseline | None, lim: Limits
) -> list[dict[str, Any]]:
    """Every alert condition that holds for one model version."""
    found: list[dict[str, Any]] = []
    if baseline is None:
        return found
    tests = (("sensitivity", True), ("specificity", True), ("referral_rate", False))
    for metric, lower_is_worse in tests:
        validated = baseline.rates.get(metric)
        observed = figures[metric]
        if validated is None or observed["n"] < lim.min_n:
            continue
        p = worse_p_value(observed, float(validated), lower_is_worse)
        if p < lim.alpha:
            found.append(
                {
                    "kind": "performance",
                    "metric": metric,
                    "observed": observed["value"],
                    "validated": validated,
                    "n": observed["n"],
                    "p_value": p,
                    "test": f"one-sided exact binomial, alpha {lim.alpha}",
                }
            )
    if drift is not None:
        value = drift["p_high"]["psi"]
        if (
            value is not None
            and value > lim.psi_limit
            and sum(drift["p_high"]["observed"]) >= lim.min_n
        ):
            found.append(
                {"kind": "drift", "metric": "p_high_psi", "observed": value, "limit": lim.psi_limit}
            )
        sc = drift["spectral_centroid"]
        if (
            sc
            and sc["shift_sd"] is not None
            and abs(sc["shift_sd"]) > lim.centroid_limit_sd
            and sc["n"] >= lim.min_n
        ):
            found.append(
                {
                    "kind": "drift",
                    "metric": "spectral_centroid",
                    "observed": sc["shift_sd"],
                    "limit": lim.centroid_limit_sd,
                }
            )
    return found


def _conditions(query: PerformanceQuery) -> list[Any]:
    c = results.c
    conditions: list[Any] = [c.outcome != "cancelled"]
    if query.model is not None:
        conditions.append(c.model_name == query.model)
    if query.version is not None:
        conditions.append(c.model_version == query.version)
    if query.device is not None:
        conditions.append(c.device_id == query.device)
    if query.since is not None:
        conditions.append(c.finished_at >= query.since)
    if query.until is not None:
        conditions.append(c.finished_at < query.until)
    return conditions


def _rows(conn: Connection, query: PerformanceQuery) -> list[Any]:
    c = results.c
    stmt = select(*RESULT_COLUMNS).where(*_conditions(query))
    return list(conn.execute(stmt.order_by(c.finished_at, c.id)))


def _centroids(
    conn: Connection, query: PerformanceQuery, keys: Iterable[tuple[str, int]]
) -> dict[tuple[str, int], list[float]]:
    """Spectral centroids of the results of these model versions, streamed (payloads are big)."""
    c = results.c
    out: dict[tuple[str, int], list[float]] = {}
    for name, version in keys:
        stmt = select(c.payload).where(
            *_conditions(query), c.model_name == name, c.model_version == version
        )
        values = out.setdefault((name, version), [])
        for row in conn.execution_options(yield_per=500).execute(stmt):
            spectrum = spectrum_of(row.payload)
            value = centroid(*spectrum) if spectrum is not None else None
            if value is not None:
                values.append(value)
    return out


def performance(
    engine: Engine,
    query: PerformanceQuery,
    baselines: Mapping[tuple[str, int], Baseline],
    limits: Limits | None = None,
) -> dict[str, Any]:
    """The figures of ``GET /api/performance``: overall, and per model version with drift."""
    limits = limits or Limits()
    with engine.connect() as conn:
        rows = _rows(conn, query)
        verdicts = latest_verdicts(conn, per="message_id")
        present = {(r.model_name or "", r.model_version) for r in rows}
        centroids = _centroids(conn, query, [k for k in baselines if k in present])
    overall = _Tally()
    models: dict[tuple[str, int | None], tuple[_Tally, dict[str, _Tally]]] = {}
    for row in rows:
        verdict = verdicts.get(row.message_id)
        overall.add(row, verdict)
        key = (row.model_name or "", row.model_version)
        tally, days = models.setdefault(key, (_Tally(), {}))
        tally.add(row, verdict)
        days.setdefault(row.finished_at.date().isoformat(), _Tally()).add(row, verdict)
    for key, values in centroids.items():
        models[key][0].centroids.extend(values)
    per_model = []
    for (name, version), (tally, days) in sorted(models.items(), key=lambda kv: str(kv[0])):
        baseline = baselines.get((name, version)) if version is not None else None
        figures = tally.figures()
        drift = _drift(tally, baseline, limits)
        per_model.append(
            {
                "model": name,
                "version": version,
                **figures,
                "validated": baseline.to_json() if baseline else None,
                "drift": drift,
                "alerts": _findings(figures, drift, baseline, limits),
                "over_time": [{"day": d, **t.figures()} for d, t in sorted(days.items())],
            }
        )
    single = per_model[0] if len(per_model) == 1 else None
    return {
        "filters": {
            "model": query.model,
            "version": query.version,
            "device": query.device,
            "since": rfc3339(query.since),
            "until": rfc3339(query.until),
        },
        "positive": "high risk (Pap IV-V: ASC-H, HSIL, AGC, AIS, SCC, adenocarcinoma)",
        **overall.figures(),
        "drift": single["drift"] if single else None,
        "models": per_model,
        "limits": vars(limits),
        "computed_at": rfc3339(utcnow()),
    }


# --- alerts ------------------------------------------------------------------------------------


def raise_alerts(engine: Engine, report: dict[str, Any]) -> int:
    """Store the report's findings as alerts (one per model version and metric, re-opened when
    it fires again) and resolve those that no longer hold; returns how many are open."""
    now = utcnow()
    open_keys: dict[str, dict[str, Any]] = {}
    for m in report["models"]:
        for f in m["alerts"]:
            key = f"{f['kind']}:{m['model']}:{m['version']}:{f['metric']}"
            open_keys[key] = {**f, "model": m["model"], "version": m["version"]}
    with engine.begin() as conn:
        known = {
            r.key: r
            for r in conn.execute(
                select(alerts.c.key, alerts.c.resolved_at).where(
                    alerts.c.kind.in_(("performance", "drift"))
                )
            )
        }
        for key, f in open_keys.items():
            detail = _detail(f)
            if key not in known:
                conn.execute(
                    insert(alerts).values(
                        key=key, kind=f["kind"], device_id=ALL_DEVICES, detail=detail,
                        created_at=now,
                    )
                )  # fmt: skip
            elif known[key].resolved_at is not None:
                conn.execute(
                    update(alerts)
                    .where(alerts.c.key == key)
                    .values(resolved_at=None, created_at=now, detail=detail)
                )
        for key, r in known.items():
            if key not in open_keys and r.resolved_at is None and _covers(key, report):
                conn.execute(update(alerts).where(alerts.c.key == key).values(resolved_at=now))
    return len(open_keys)


def _covers(key: str, report: dict[str, Any]) -> bool:
    """Whether ``report`` looked at the model version of alert ``key`` (only then resolve it)."""
    _, model, version, _ = key.split(":", 3)
    return any(m["model"] == model and str(m["version"]) == version for m in report["models"])


def _detail(f: dict[str, Any]) -> str:
    who = f"{f['model']} v{f['version']}"
    if f["kind"] == "performance":
        return (
            f"{who}: {f['metric']} {f['observed']:.3f} on {f['n']} slides, significantly worse "
            f"than validated {f['validated']:.3f} (p = {f['p_value']:.2g}, {f['test']})"
        )
    return f"{who}: drift {f['metric']} {f['observed']:.3f} past the limit {f['limit']}"
