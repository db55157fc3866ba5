"""``omis validate``: a locked validation of a bundle, scored exactly as the device would.

Order of work (the operating point is demonstrably fixed before the test data are seen):

1. open the bundle (every file checked against its manifest) and read the data: spectra of a
   ``spectrum`` dataset (an archive export) must lie on the bundle's spectral axis;
2. write the **lock record** -- bundle manifest sha256, model sha256, thresholds (decision, abstain
   band, out_of_range), QC thresholds, the data's manifest and file digests, the time -- or, when
   one exists for this bundle and data, check it and keep its time;
3. score every slide with the device's code: :class:`inference.pipeline.SlidePipeline` behind the
   golden-checked ONNX Runtime backend (raw fields go through the device's QC and spectrum; a
   finished spectrum through :meth:`~inference.pipeline.SlidePipeline.classify_spectrum`);
4. only then read the labels and compute the figures.

Figures: referral rate (abstained / scored slides); sensitivity and specificity on decided
(classified) slides, and with referrals counted as reviewed (a referred slide goes to a person,
so it counts as a positive call); ROC AUC of p(high) with DeLong's interval; with several slides
per patient, patient-level figures (a patient is positive when any slide is, called positive
when any slide is called high or referred) and a cluster bootstrap (patients resampled) of the
slide-level figures; per-site figures when the manifest has a ``site`` column.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from statistics import NormalDist
from typing import Any

import numpy as np

from firmware_bridge.exceptions import InputError
from firmware_bridge.fsutil import atomic_write_bytes
from firmware_bridge.images import read_rgb
from inference.backends import BackendOptions
from inference.bundle import Bundle, load_bundle
from inference.exceptions import BundleError, InferenceError
from inference.pipeline import FieldPair, NoUsableFieldError, PipelineConfig, SlidePipeline
from inference.spectrum import parse_params
from training.compare import auc_with_interval
from training.data import (
    MANIFEST_NAME,
    Dataset,
    _SlideRows,
    files_digest,
    get_task,
    load_dataset,
    read_manifest,
)
from training.exceptions import DataError, TrainingError
from training.metrics import proportion

log = logging.getLogger(__name__)

LOCK_SCHEMA = "omis.validation-lock/1"
REPORT_SCHEMA = "omis.validation/1"
LOCK_DIR = "validation-locks"
BOOTSTRAP = 2000


class LockError(DataError):
    """A lock record that does not match the bundle or the data."""


@dataclass(frozen=True)
class Scored:
    """One slide as the device decided it."""

    slide_id: str
    patient_id: str
    site: str
    pap_group: str
    outcome: str
    reason: str | None
    call: str | None
    p_high: float | None


# --- lock ---------------------------------------------------------------------------------------


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def lock_fields(bundle: Bundle, data: dict[str, Any]) -> dict[str, Any]:
    """What the lock fixes: the bundle, its operating point, the data."""
    m = bundle.manifest
    manifest_bytes = (Path(bundle.root) / "manifest.json").read_bytes()
    return {
        "bundle": {
            "name": m.name,
            "version": m.version,
            "manifest_sha256": _sha256(manifest_bytes),
            "model_sha256": bundle.describe().get("sha256"),
        },
        "thresholds": m.thresholds.model_dump(mode="json"),
        "qc": bundle.manifest.qc_thresholds.model_dump(mode="json"),
        "data": data,
    }


def _mismatch(existing: dict[str, Any], fields: dict[str, Any]) -> str | None:
    checks = (
        ("bundle", "manifest_sha256", "bundle"),
        ("thresholds", None, "thresholds"),
        ("qc", None, "QC thresholds"),
        ("data", "files_sha256", "data"),
    )
    for key, sub, what in checks:
        a, b = existing.get(key), fields[key]
        if sub is not None:
            a, b = (a or {}).get(sub), b[sub]
        if a != b:
            return what
    return None


def take_lock(path: Path, fields: dict[str, Any]) -> dict[str, Any]:
    """Write the lock record at ``path``, or check the one there; returns it with its sha256."""
    if path.is_file():
        try:
            existing = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise LockError(f"lock {path}: unreadable ({exc})") from exc
        if not isinstance(existing, dict) or existing.get("schema") != LOCK_SCHEMA:
            raise LockError(f"lock {path}: not an {LOCK_SCHEMA} record")
        what = _mismatch(existing, fields)
        if what is not None:
            raise LockError(
                f"lock {path}: its {what} do(es) not match this bundle and data (locked "
                f"{existing.get('created')}); validate the locked bundle on the locked data"
            )
        record = existing
    else:
        record = {
            "schema": LOCK_SCHEMA,
            **fields,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        blob = (json.dumps(record, indent=2, allow_nan=False) + "\n").encode("utf-8")
        atomic_write_bytes(path, blob)
        log.info("lock record written before reading any label: %s", path)
    return {**record, "path": str(path), "sha256": _sha256(path.read_bytes())}


# --- scoring ------------------------------------------------------------------------------------


def _open(bundle: Bundle) -> tuple[SlidePipeline, Any]:
    from inference.golden import open_checked

    try:
        backend, _ = open_checked(
            "onnxruntime", bundle, BackendOptions(max_batch=1), spectrum_backend="numpy"
        )
    except InferenceError as exc:
        raise TrainingError(f"bundle {bundle.root}: {exc}") from exc
    return SlidePipeline(bundle, backend, PipelineConfig(spectrum_backend="numpy")), backend


def _as_scored(sr: _SlideRows, site: str, res: Any) -> Scored:
    outcome = "abstained" if res.abstained else "classified"
    reason = res.abstain_reason.value if res.abstain_reason else None
    call = "refer" if res.abstained else res.risk
    return Scored(sr.slide_id, sr.patient_id, site, sr.pap_group, outcome, reason, call, res.p_high)


def _score_spectra(pipe: SlidePipeline, ds: Dataset) -> list[Scored]:
    out = []
    for s in ds.slides:
        res = pipe.classify_spectrum(s.x_nm, s.y)
        sr = _SlideRows(s.slide_id, s.patient_id, s.pap_group)
        out.append(_as_scored(sr, s.study.get("site", ""), res))
    return out


def _score_fields(pipe: SlidePipeline, root: Path, slides: Sequence[_SlideRows]) -> list[Scored]:
    out = []
    for sr in slides:
        try:
            pairs = [
                FieldPair(
                    i, read_rgb(root / r.values["diffuse"]), read_rgb(root / r.values["polarized"])
                )
                for i, r in enumerate(sr.rows)
            ]
        except InputError as exc:
            raise DataError(f"slide {sr.slide_id!r}: {exc}") from exc
        site = sr.rows[0].values.get("site", "")
        try:
            out.append(_as_scored(sr, site, pipe.run_slide(pairs)))
        except NoUsableFieldError as exc:
            out.append(
                Scored(
                    sr.slide_id, sr.patient_id, site, sr.pap_group, "failed", str(exc), None, None
                )
            )
    return out


# --- figures ------------------------------------------------------------------------------------


def _arrays(scored: Sequence[Scored], high_groups: set[str]) -> dict[str, Any]:
    truth = np.array([s.pap_group in high_groups for s in scored], dtype=bool)
    decided = np.array([s.outcome == "classified" for s in scored], dtype=bool)
    referred = np.array([s.outcome == "abstained" for s in scored], dtype=bool)
    called_high = np.array([s.call == "high" for s in scored], dtype=bool)
    return {"truth": truth, "decided": decided, "referred": referred, "high": called_high}


def _sens_spec(a: dict[str, Any], idx: Any = None) -> tuple[dict[str, Any], dict[str, Any]]:
    t, d, h = a["truth"], a["decided"], a["high"]
    if idx is not None:
        t, d, h = t[idx], d[idx], h[idx]
    pos, neg = t & d, ~t & d
    return (
        proportion(int((h & pos).sum()), int(pos.sum())),
        proportion(int((~h & neg).sum()), int(neg.sum())),
    )


def _with_referrals(a: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    scored = a["decided"] | a["referred"]
    positive_call = a["high"] | a["referred"]
    pos, neg = a["truth"] & scored, ~a["truth"] & scored
    return (
        proportion(int((positive_call & pos).sum()), int(pos.sum())),
        proportion(int((~positive_call & neg).sum()), int(neg.sum())),
    )


def _patients(scored: Sequence[Scored], a: dict[str, Any], seed: int) -> dict[str, Any] | None:
    ids = [s.patient_id for s in scored]
    names = sorted(set(ids))
    if len(names) == len(ids):
        return None
    index = {p: i for i, p in enumerate(names)}
    g = np.array([index[p] for p in ids])
    pos_p = np.zeros(len(names), dtype=bool)
    call_p = np.zeros(len(names), dtype=bool)
    np.logical_or.at(pos_p, g, a["truth"])
    np.logical_or.at(call_p, g, a["high"] | a["referred"])
    rng = np.random.default_rng(seed)
    sens, spec = [], []
    members = [np.flatnonzero(g == i) for i in range(len(names))]
    for _ in range(BOOTSTRAP):
        pick = rng.integers(0, len(names), len(names))
        idx = np.concatenate([members[i] for i in pick])
        se, sp = _sens_spec(a, idx)
        if se["value"] is not None:
            sens.append(se["value"])
        if sp["value"] is not None:
            spec.append(sp["value"])

    def interval(values: list[float]) -> list[float] | None:
        return (
            [float(np.quantile(values, 0.025)), float(np.quantile(values, 0.975))]
            if values
            else None
        )

    return {
        "patients": len(names),
        "slides": len(ids),
        "rule": "a patient is positive when any slide is; called positive when any slide is "
        "called high or referred",
        "sensitivity": proportion(int((call_p & pos_p).sum()), int(pos_p.sum())),
        "specificity": proportion(int((~call_p & ~pos_p).sum()), int((~pos_p).sum())),
        "cluster_bootstrap": {
            "resamples": BOOTSTRAP,
            "seed": seed,
            "sensitivity_ci95": interval(sens),
            "specificity_ci95": interval(spec),
        },
    }


def _per_site(scored: Sequence[Scored], a: dict[str, Any]) -> dict[str, Any] | None:
    sites = [s.site for s in scored]
    if not any(sites):
        return None
    out = {}
    for site in sorted(set(sites)):
        idx = np.array([s == site for s in sites])
        se, sp = _sens_spec(a, idx)
        ref = a["referred"][idx]
        out[site or "(none)"] = {
            "n": int(idx.sum()),
            "sensitivity": se,
            "specificity": sp,
            "referral_rate": proportion(int(ref.sum()), int(idx.sum())),
        }
    return out


def figures(scored: Sequence[Scored], high_groups: set[str], seed: int = 0) -> dict[str, Any]:
    """Every figure of the report from the scored slides and their labels."""
    a = _arrays(scored, high_groups)
    sens, spec = _sens_spec(a)
    sens_r, spec_r = _with_referrals(a)
    with_p = np.array([s.p_high is not None for s in scored], dtype=bool)
    p = np.array([s.p_high if s.p_high is not None else 0.0 for s in scored], dtype=np.float64)
    auc = auc_with_interval(a["truth"][with_p], p[with_p]) if with_p.any() else None
    n_scored = int((a["decided"] | a["referred"]).sum())
    return {
        "n": len(scored),
        "outcomes": {
            k: sum(1 for s in scored if s.outcome == k)
            for k in ("classified", "abstained", "failed")
        },
        "referral_rate": proportion(int(a["referred"].sum()), n_scored),
        "failed_rate": proportion(sum(1 for s in scored if s.outcome == "failed"), len(scored)),
        "sensitivity": {**sens, "on": "decided (classified) slides"},
        "specificity": {**spec, "on": "decided (classified) slides"},
        "sensitivity_with_referrals": {**sens_r, "on": "referred slides counted as positive calls"},
        "specificity_with_referrals": {**spec_r, "on": "referred slides counted as positive calls"},
        "roc_auc": auc,
        "patient_level": _patients(scored, a, seed),
        "per_site": _per_site(scored, a),
    }


# --- entry point --------------------------------------------------------------------------------


def _read(
    bundle: Bundle, data_dir: Path, cache_dir: Path | None
) -> tuple[str, Any, dict[str, Any]]:
    params = parse_params(bundle.manifest.spectrum)
    kind, slide_rows, digest = read_manifest(data_dir)
    if kind == "images":
        raise DataError(
            f"{data_dir}: an image dataset; the device never sees rendered images, validate on "
            "spectra (omis dataset export) or raw fields"
        )
    data: dict[str, Any] = {"manifest_sha256": digest, "slides": len(slide_rows)}
    if kind == "spectra":
        # reads every spectrum: one on another axis than the bundle's is an error before the lock
        ds = load_dataset(data_dir, params, cache_dir=cache_dir)
        data["files_sha256"] = ds.files_sha256
        return kind, ds, data
    data["files_sha256"] = files_digest(data_dir, kind, slide_rows, digest)
    return kind, slide_rows, data


def validate(
    bundle_path: Path,
    data_dir: Path,
    *,
    lock_path: Path | None = None,
    cache_dir: Path | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """The locked validation report (see the module docstring for the order of work)."""
    try:
        bundle = load_bundle(bundle_path)
    except BundleError as exc:
        raise TrainingError(f"bundle {bundle_path}: {exc}") from exc
    if not (data_dir / MANIFEST_NAME).is_file():
        raise DataError(f"{data_dir}: no {MANIFEST_NAME} (an empty export?)")
    kind, data, data_record = _read(bundle, data_dir, cache_dir)
    fields = lock_fields(bundle, data_record)
    if lock_path is None:
        name = f"{fields['bundle']['manifest_sha256'][:16]}-{data_record['files_sha256'][:16]}.json"
        lock_path = data_dir / LOCK_DIR / name
    lock = take_lock(lock_path, fields)
    pipe, backend = _open(bundle)
    with backend:
        scored = (
            _score_spectra(pipe, data) if kind == "spectra" else _score_fields(pipe, data_dir, data)
        )
    # labels are read from here on
    task = get_task(bundle.manifest.task)
    high = set(bundle.manifest.high_classes)
    high_groups = {g for g, c in task.group_to_class.items() if c in high}
    report = {
        "schema": REPORT_SCHEMA,
        "lock": lock,
        "bundle": bundle.describe(),
        "data": {"path": str(data_dir), "kind": kind, **data_record},
        "decision": "the device's: thresholds, abstain band and out_of_range of the bundle",
        **figures(scored, high_groups, seed),
        "slides": [
            {
                "slide_id": s.slide_id,
                "patient_id": s.patient_id,
                "truth": "high" if s.pap_group in high_groups else "low",
                "pap_group": s.pap_group,
                "outcome": s.outcome,
                "reason": s.reason,
                "call": s.call,
                "p_high": s.p_high,
            }
            for s in scored
        ],
    }
    return report


# --- sample size ---------------------------------------------------------------------------------


def sample_size(
    sensitivity: float,
    margin: float,
    prevalence: float,
    specificity: float | None = None,
    confidence: float = 0.95,
) -> dict[str, Any]:
    """Slides needed to estimate sensitivity (and specificity) within ``margin`` (Buderer 1996)."""
    for name, v in (("sensitivity", sensitivity), ("prevalence", prevalence)):
        if not 0.0 < v < 1.0:
            raise DataError(f"--{name} must lie strictly between 0 and 1, got {v}")
    if not 0.0 < margin < 0.5:
        raise DataError(f"--margin must lie strictly between 0 and 0.5, got {margin}")
    if specificity is not None and not 0.0 < specificity < 1.0:
        raise DataError(f"--specificity must lie strictly between 0 and 1, got {specificity}")
    z = NormalDist().inv_cdf(1.0 - (1.0 - confidence) / 2.0)
    positives = math.ceil(z * z * sensitivity * (1.0 - sensitivity) / (margin * margin))
    slides = math.ceil(positives / prevalence)
    out: dict[str, Any] = {
        "method": "Buderer (1996): n = z^2 p (1 - p) / d^2 positives (negatives), divided by the "
        "prevalence (1 - prevalence)",
        "confidence": confidence,
        "sensitivity": sensitivity,
        "margin": margin,
        "prevalence": prevalence,
        "positives_needed": positives,
        "slides_for_sensitivity": slides,
        "slides": slides,
    }
    if specificity is not None:
        negatives = math.ceil(z * z * specificity * (1.0 - specificity) / (margin * margin))
        out.update(
            specificity=specificity,
            negatives_needed=negatives,
            slides_for_specificity=math.ceil(negatives / (1.0 - prevalence)),
        )
        out["slides"] = max(slides, out["slides_for_specificity"])
    return out
