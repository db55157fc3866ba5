"""Study metadata in training: grouped folds, per-site/per-device figures, the export record,
and the reference distribution a bundle carries for monitoring in service.

* ``--group-by patient`` (default) keeps the stratified patient-grouped K folds;
  ``--group-by device|site`` makes the cross-validation leave-one-group-out (scikit-learn's
  ``LeaveOneGroupOut``): each fold tests one device or site the model never saw.
* ``by_study`` in ``report.json``: sensitivity and specificity (Wilson 95 %) per value of each
  study column the manifest fills (``site``, ``device_id``).
* ``reference_distribution`` in the bundle's ``training.metrics``: the out-of-fold p(high)
  histogram, the spectral centroid of the training slides and the validated rates, which
  ``GET /api/performance`` compares service data with (docs/collector.md).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
from sklearn.model_selection import LeaveOneGroupOut

from inference.bundle import Thresholds
from training.data import Dataset, Slide
from training.evaluate import make_folds
from training.exceptions import DataError
from training.metrics import proportion

log = logging.getLogger(__name__)

F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]
B = npt.NDArray[np.bool_]
Fold = tuple[I64, I64]
GroupBy = Literal["patient", "device", "site"]
GROUP_COLUMNS: dict[str, str] = {"device": "device_id", "site": "site"}
FIGURE_COLUMNS = ("site", "device_id")
P_HIGH_EDGES = [round(0.1 * i, 1) for i in range(11)]
EXPORT_RECORD = "export.json"


def group_values(slides: Sequence[Slide], group_by: GroupBy) -> list[str]:
    """The group of every slide; a DataError names the first slide without one."""
    if group_by == "patient":
        return [s.patient_id for s in slides]
    column = GROUP_COLUMNS[group_by]
    values = []
    for s in slides:
        value = s.study.get(column, "")
        if not value:
            raise DataError(
                f"--group-by {group_by}: slide {s.slide_id!r} has no {column} in manifest.csv"
            )
        values.append(value)
    return values


def study_folds(
    labels: I64, slides: Sequence[Slide], group_by: GroupBy, k: int, seed: int
) -> list[Fold]:
    """Patient-grouped stratified K folds, or leave-one-device/site-out."""
    groups = group_values(slides, group_by)
    if group_by == "patient":
        return make_folds(labels, groups, k, seed)
    n = len(set(groups))
    if n < 2:
        raise DataError(f"--group-by {group_by}: leave-one-group-out needs >= 2 groups, got {n}")
    splitter = LeaveOneGroupOut()
    x = np.zeros((labels.size, 1))
    return [
        (np.asarray(tr, dtype=np.int64), np.asarray(te, dtype=np.int64))
        for tr, te in splitter.split(x, labels, groups=groups)
    ]


def by_study(slides: Sequence[Slide], positive: B, called: B) -> dict[str, Any] | None:
    """Sensitivity and specificity per value of each filled study column; None when none is."""
    out: dict[str, Any] = {}
    for column in FIGURE_COLUMNS:
        values = [s.study.get(column, "") for s in slides]
        if not any(values):
            continue
        table: dict[str, Any] = {}
        for value in sorted(set(values)):
            idx = np.array([v == value for v in values])
            pos, neg = positive & idx, ~positive & idx
            table[value or "(none)"] = {
                "n": int(idx.sum()),
                "sensitivity": proportion(int((called & pos).sum()), int(pos.sum())),
                "specificity": proportion(int((~called & neg).sum()), int(neg.sum())),
            }
        out[column] = table
    return out or None


def spectral_centroid(x_nm: F64, y: F64) -> float:
    """Centre of mass of |y| along the spectral axis (nm)."""
    weight = np.abs(np.asarray(y, dtype=np.float64))
    total = float(weight.sum())
    return float((np.asarray(x_nm) * weight).sum() / total) if total > 0 else 0.0


def reference_distribution(
    ds: Dataset,
    p_high: F64,
    thresholds: Thresholds,
    metrics: dict[str, Any],
    referral_rate: float | None = None,
) -> dict[str, Any]:
    """What service data are compared with: p(high) histogram, centroid, validated rates.

    ``referral_rate``: the shipped band's validated rate (``training.operating_point``);
    without it, the share of out-of-fold predictions inside the shipped band (which mixes
    the fold models' scales with the shipped model's band: only for bundles without one).
    """
    counts, _ = np.histogram(np.clip(p_high, 0.0, 1.0), bins=P_HIGH_EDGES)
    band = (p_high >= thresholds.abstain_low) & (p_high <= thresholds.abstain_high)
    if referral_rate is None:
        referral_rate = float(band.mean()) if p_high.size else None
    out: dict[str, Any] = {
        "source": "out-of-fold cross-validation predictions of the training slides",
        "n": int(p_high.size),
        "p_high": {"edges": P_HIGH_EDGES, "counts": [int(c) for c in counts]},
        "rates": {
            "sensitivity": (metrics.get("sensitivity") or {}).get("value"),
            "specificity": (metrics.get("specificity") or {}).get("value"),
            "referral_rate": referral_rate,
        },
    }
    spectra = [(s.x_nm, s.y) for s in ds.slides if s.x_nm is not None and s.y is not None]
    if spectra:
        c = np.array([spectral_centroid(x, y) for x, y in spectra])
        out["spectral_centroid_nm"] = {
            "mean": float(c.mean()),
            "sd": float(c.std(ddof=1)) if c.size > 1 else 0.0,
            "n": int(c.size),
        }
    return out


def export_record(ds: Dataset) -> dict[str, Any] | None:
    """``export.json`` of an archive export, checked against the data actually read."""
    path = Path(ds.root) / EXPORT_RECORD
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: unreadable export record ({exc})") from exc
    if not isinstance(record, dict) or "sha256" not in record:
        raise DataError(f"{path}: not an omis dataset export record")
    if record.get("rows") != ds.stats.slides_in_manifest:
        log.info("training on a part of the export (%s slides)", ds.stats.slides_in_manifest)
    elif record["sha256"] != ds.files_sha256:
        raise DataError(
            f"{path}: the data changed since the export (export sha256 "
            f"{str(record['sha256'])[:12]}…, files now {ds.files_sha256[:12]}…); export again"
        )
    return {k: record.get(k) for k in ("sha256", "rows", "query", "source", "created")}
