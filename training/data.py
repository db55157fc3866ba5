"""Training data: a manifest of slides, turned into spectra with the device's own code.

A dataset directory holds ``manifest.csv`` with ``slide_id,patient_id,pap_group`` and one of

* ``field,diffuse,polarized`` — raw W/P field pairs, one row per field (``omis dataset synth``
  and ``omis acquire`` layouts);
* ``spectrum`` — a precomputed spectrum per slide (``.npy`` or ``.csv`` holding ``y`` or
  ``x,y``);
* ``image`` — a rendered spectrum image per slide (PNG, RGB).

Paths are relative to the directory.  Every bad row is reported, with its line number, in one
:class:`DataError`; nothing is skipped silently.  Spectra of raw fields come from
:func:`inference.spectrum.qc.compute_slide_spectrum` (numpy backend), so fields failing quality
control are left out and counted, and they are cached on disk under a key of the algorithm,
its parameters, the QC thresholds and the sha256 of every image file.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import zipfile
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from firmware_bridge.exceptions import InputError
from firmware_bridge.fsutil import atomic_write_bytes
from firmware_bridge.images import read_rgb
from inference.exceptions import SpectrumInputError
from inference.spectrum import WdiffParams, axis_nm
from inference.spectrum.params import RbhistParams
from inference.spectrum.qc import QCThresholds, compute_slide_spectrum
from training.exceptions import DataError

log = logging.getLogger(__name__)

F64 = npt.NDArray[np.float64]
U8 = npt.NDArray[np.uint8]
I64 = npt.NDArray[np.int64]
Params = WdiffParams | RbhistParams
Kind = Literal["fields", "spectra", "images"]

MANIFEST_NAME = "manifest.csv"
CACHE_VERSION = "omis-train-cache-v1"
BASE_COLUMNS = ("slide_id", "patient_id", "pap_group")
KIND_COLUMNS: dict[Kind, tuple[str, ...]] = {
    "fields": ("field", "diffuse", "polarized"),
    "spectra": ("spectrum",),
    "images": ("image",),
}
PAP_GROUPS = ("II", "III", "IV", "V")
# Optional study columns (omis dataset export writes them); kept per slide for grouping and
# per-site / per-device figures.
STUDY_COLUMNS = ("device_id", "site", "acquired_at", "model_version", "reference")
REFERENCES = ("cytology", "histology")
_GROUP_ALIASES = {
    **{g.lower(): g for g in PAP_GROUPS},
    **{str(i + 2): g for i, g in enumerate(PAP_GROUPS)},
    **{f"pap{i + 2}": g for i, g in enumerate(PAP_GROUPS)},
}
MAX_LISTED_PROBLEMS = 40


@dataclass(frozen=True)
class Task:
    """A classification task: classes, how Pap groups map onto them, and their risk."""

    name: str
    classes: tuple[str, ...]
    group_to_class: dict[str, int]
    risk: dict[str, Literal["low", "high"]]

    @property
    def high_classes(self) -> tuple[int, ...]:
        """Indices of the classes whose risk is high."""
        return tuple(i for i, c in enumerate(self.classes) if self.risk[c] == "high")

    def labels(self, groups: Sequence[str]) -> npt.NDArray[np.int64]:
        """Class index of each Pap group."""
        return np.array([self.group_to_class[g] for g in groups], dtype=np.int64)


TASKS: dict[str, Task] = {
    "binary": Task(
        "binary",
        ("low", "high"),
        {"II": 0, "III": 0, "IV": 1, "V": 1},
        {"low": "low", "high": "high"},
    ),
    "pap4": Task(
        "pap4",
        PAP_GROUPS,
        {g: i for i, g in enumerate(PAP_GROUPS)},
        {"II": "low", "III": "low", "IV": "high", "V": "high"},
    ),
    # Pap II against Pap V only (the problem of the study's Naive Bayes row); III and IV
    # slides are left out of such a run.
    "ii-v": Task("ii-v", ("II", "V"), {"II": 0, "V": 1}, {"II": "low", "V": "high"}),
}


def get_task(name: str) -> Task:
    """The task called ``name`` (``binary``, ``pap4`` or ``ii-v``)."""
    try:
        return TASKS[name]
    except KeyError:
        raise DataError(f"unknown task {name!r}; known: {', '.join(TASKS)}") from None


@dataclass(frozen=True)
class Slide:
    """One slide: identity, label and either its spectrum or its spectrum image."""

    slide_id: str
    patient_id: str
    pap_group: str
    x_nm: F64 | None = None
    y: F64 | None = None
    image: U8 | None = None
    fields_used: int = 0
    fields_rejected: int = 0
    study: dict[str, str] = field(default_factory=dict)


def study_values(row: _Row) -> dict[str, str]:
    """The study columns a manifest row fills (empty values left out)."""
    return {c: row.values[c] for c in STUDY_COLUMNS if row.values.get(c)}


@dataclass
class PrepStats:
    """What data preparation did: counts, cache use and the fields quality control rejected."""

    slides_in_manifest: int = 0
    slides_used: int = 0
    fields_total: int = 0
    fields_used: int = 0
    fields_rejected: int = 0
    cache_hits: int = 0
    cache_misses: int = 0
    rejected: list[dict[str, Any]] = field(default_factory=list)
    slides_excluded: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """JSON object for the report."""
        return {
            "slides_in_manifest": self.slides_in_manifest,
            "slides_used": self.slides_used,
            "fields_total": self.fields_total,
            "fields_used": self.fields_used,
            "fields_rejected": self.fields_rejected,
            "cache_hits": self.cache_hits,
            "cache_misses": self.cache_misses,
            "rejected_by_reason": self.rejected_by_reason,
            "rejected_fields": self.rejected,
            "slides_excluded": self.slides_excluded,
        }

    @property
    def rejected_by_reason(self) -> dict[str, int]:
        """How many rejected fields each QC reason applied to (a field can have several)."""
        counts = Counter(reason for f in self.rejected for reason in f["reasons"])
        return dict(sorted(counts.items()))


@dataclass(frozen=True)
class Dataset:
    """A prepared dataset: slides in manifest order with their spectra or images."""

    root: Path
    kind: Kind
    slides: tuple[Slide, ...]
    manifest_sha256: str
    params: Params
    stats: PrepStats
    files_sha256: str = ""
    # The QC thresholds every used field passed; they go into the bundle for the device.
    qc: QCThresholds = field(default_factory=QCThresholds)

    @property
    def groups(self) -> list[str]:
        """Pap group of each slide."""
        return [s.pap_group for s in self.slides]

    @property
    def patients(self) -> list[str]:
        """Patient id of each slide."""
        return [s.patient_id for s in self.slides]

    @property
    def has_spectra(self) -> bool:
        """True when every slide has a spectrum (raw fields or precomputed spectra)."""
        return self.kind != "images"


@dataclass
class _Row:
    line: int
    slide_id: str
    patient_id: str
    pap_group: str
    values: dict[str, str]


@dataclass
class _SlideRows:
    slide_id: str
    patient_id: str
    pap_group: str
    rows: list[_Row] = field(default_factory=list)


# --- manifest ------------------------------------------------------------------------------


def _detect_kind(header: Sequence[str], path: Path) -> Kind:
    missing = [c for c in BASE_COLUMNS if c not in header]
    if missing:
        raise DataError(f"{path}: missing column(s) {', '.join(missing)}")
    for kind, cols in KIND_COLUMNS.items():
        if all(c in header for c in cols):
            return kind
    wanted = " | ".join(",".join(c) for c in KIND_COLUMNS.values())
    raise DataError(f"{path}: needs the columns of one data kind: {wanted}")


def _normalise_group(value: str) -> str | None:
    v = value.strip()
    return v if v in PAP_GROUPS else _GROUP_ALIASES.get(v.lower())


JPEG_MAGIC = b"\xff\xd8\xff"


def is_lossy(path: Path) -> bool:
    """True for a JPEG file (by its first bytes, whatever its name)."""
    with path.open("rb") as fh:
        return fh.read(3) == JPEG_MAGIC


def _row_problems(row: _Row, root: Path, kind: Kind, allow_lossy: bool = False) -> list[str]:
    problems = []
    if not row.slide_id:
        problems.append("empty slide_id")
    if not row.patient_id:
        problems.append("empty patient_id")
    if _normalise_group(row.pap_group) is None:
        problems.append(f"unknown pap_group {row.pap_group!r} (known: {', '.join(PAP_GROUPS)})")
    reference = row.values.get("reference", "")
    if reference and reference not in REFERENCES:
        problems.append(f"unknown reference {reference!r} (known: {', '.join(REFERENCES)})")
    for col in KIND_COLUMNS[kind]:
        if col == "field":
            if not row.values.get(col, "").strip():
                problems.append("empty field id")
            continue
        rel = row.values.get(col, "").strip()
        if not rel:
            problems.append(f"empty {col} path")
        elif not (root / rel).is_file():
            problems.append(f"{col} file {rel!r} not found")
        elif col != "spectrum" and not allow_lossy and is_lossy(root / rel):
            problems.append(f"{col} file {rel!r} is lossy JPEG (--allow-lossy accepts it)")
    return problems


def _group_rows(rows: list[_Row], kind: Kind) -> tuple[dict[str, _SlideRows], list[str]]:
    """Group rows into slides and collect the cross-row problems (duplicates, inconsistency)."""
    slides: dict[str, _SlideRows] = {}
    seen: dict[tuple[str, str], int] = {}
    problems: list[str] = []
    for row in rows:
        fid = row.values.get("field", "").strip() if kind == "fields" else ""
        key = (row.slide_id, fid)
        if key in seen:
            what = f"field {fid!r} of slide" if kind == "fields" else "slide"
            problems.append(
                f"line {row.line}: duplicate {what} {row.slide_id!r} (first on line {seen[key]})"
            )
            continue
        seen[key] = row.line
        group = _normalise_group(row.pap_group) or row.pap_group
        slide = slides.setdefault(row.slide_id, _SlideRows(row.slide_id, row.patient_id, group))
        if row.patient_id != slide.patient_id:
            problems.append(
                f"line {row.line}: slide {row.slide_id!r} has patient {row.patient_id!r}, "
                f"but {slide.patient_id!r} on line {slide.rows[0].line}"
            )
        if group != slide.pap_group:
            problems.append(
                f"line {row.line}: slide {row.slide_id!r} has pap_group {group!r}, "
                f"but {slide.pap_group!r} on line {slide.rows[0].line}"
            )
        slide.rows.append(row)
    return slides, problems


def _raise_problems(path: Path, problems: list[str]) -> None:
    if not problems:
        return
    shown = problems[:MAX_LISTED_PROBLEMS]
    more = len(problems) - len(shown)
    tail = f"; … and {more} more" if more else ""
    raise DataError(f"{path}: {len(problems)} problem(s): {'; '.join(shown)}{tail}")


def read_manifest(root: Path, *, allow_lossy: bool = False) -> tuple[Kind, list[_SlideRows], str]:
    """Read and check ``root/manifest.csv``: (kind, slides in order, sha256 of the manifest)."""
    path = root / MANIFEST_NAME
    if not path.is_file():
        raise DataError(f"{root}: no {MANIFEST_NAME} (is this a dataset directory?)")
    data = path.read_bytes()
    reader = csv.DictReader(io.StringIO(data.decode("utf-8-sig")))
    header = [h.strip() for h in (reader.fieldnames or [])]
    reader.fieldnames = header
    kind = _detect_kind(header, path)
    rows: list[_Row] = []
    problems: list[str] = []
    for record in reader:
        values = {k: (v or "").strip() for k, v in record.items() if k is not None}
        row = _Row(
            reader.line_num,
            values.get("slide_id", ""),
            values.get("patient_id", ""),
            values.get("pap_group", ""),
            values,
        )
        problems.extend(
            f"line {row.line}: {p}" for p in _row_problems(row, root, kind, allow_lossy)
        )
        rows.append(row)
    if not rows:
        raise DataError(f"{path}: no data rows")
    slides, cross = _group_rows(rows, kind)
    _raise_problems(path, problems + cross)
    return kind, list(slides.values()), hashlib.sha256(data).hexdigest()


# --- spectra of raw fields, with the cache ---------------------------------------------------


def sha256_path(path: Path) -> str:
    """Hex sha256 of a file."""
    h = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def cache_key(params: Params, thresholds: QCThresholds, file_hashes: Sequence[str]) -> str:
    """Key of a slide spectrum: algorithm and parameters, QC thresholds, image file hashes."""
    blob = json.dumps(
        {
            "version": CACHE_VERSION,
            "spectrum": params.model_dump(),
            "qc": thresholds.model_dump(),
            "files": list(file_hashes),
        },
        sort_keys=True,
        allow_nan=False,
    )
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class _Cached:
    x_nm: F64
    y: F64
    fields: list[dict[str, Any]]


def _cache_load(path: Path) -> _Cached | None:
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            fields = json.loads(str(z["fields"]))
            return _Cached(z["x_nm"].astype(np.float64), z["y"].astype(np.float64), fields)
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
        log.warning("spectrum cache entry %s unreadable (%s); recomputing", path.name, exc)
        return None


def _cache_store(path: Path, entry: _Cached) -> None:
    buf = io.BytesIO()
    np.savez(
        buf, x_nm=entry.x_nm, y=entry.y, fields=np.array(json.dumps(entry.fields, allow_nan=False))
    )
    atomic_write_bytes(path, buf.getvalue())


def _compute_fields(
    root: Path, slide: _SlideRows, params: Params, thresholds: QCThresholds
) -> _Cached:
    pairs = []
    for row in slide.rows:
        try:
            w = read_rgb(root / row.values["diffuse"])
            p = read_rgb(root / row.values["polarized"])
        except InputError as exc:
            raise DataError(f"line {row.line}: {exc}") from exc
        pairs.append((w, p))
    try:
        result = compute_slide_spectrum(pairs, params, backend="numpy", thresholds=thresholds)
    except SpectrumInputError as exc:
        if "no field passed" not in str(exc):
            raise DataError(f"slide {slide.slide_id!r} (line {slide.rows[0].line}): {exc}") from exc
        fields = [
            {"field": r.values["field"], "verdict": "reject", "reasons": ["no field passed QC"]}
            for r in slide.rows
        ]
        return _Cached(np.zeros(0), np.zeros(0), [*fields, {"error": str(exc)}])
    fields = [
        {"field": row.values["field"], "verdict": q.verdict, "reasons": list(q.reasons)}
        for row, q in zip(slide.rows, result.fields, strict=True)
    ]
    return _Cached(result.spectrum.x_nm, result.spectrum.y, fields)


def _slide_from_fields(
    root: Path,
    slide: _SlideRows,
    *,
    params: Params,
    thresholds: QCThresholds,
    cache_dir: Path | None,
    stats: PrepStats,
) -> Slide | None:
    cols = ("diffuse", "polarized")
    hashes = [sha256_path(root / row.values[c]) for row in slide.rows for c in cols]
    key = cache_key(params, thresholds, hashes)
    path = cache_dir / f"{key}.npz" if cache_dir is not None else None
    entry = _cache_load(path) if path is not None else None
    if entry is not None:
        stats.cache_hits += 1
    else:
        stats.cache_misses += 1
        entry = _compute_fields(root, slide, params, thresholds)
        if path is not None:
            _cache_store(path, entry)
    per_field = [f for f in entry.fields if "field" in f]
    rejected = [f for f in per_field if f["verdict"] != "ok"]
    stats.fields_total += len(per_field)
    stats.fields_rejected += len(rejected)
    stats.fields_used += len(per_field) - len(rejected)
    stats.rejected.extend({"slide_id": slide.slide_id, **f} for f in rejected)
    if entry.y.size == 0:
        reason = next((f["error"] for f in entry.fields if "error" in f), "no field passed QC")
        stats.slides_excluded.append({"slide_id": slide.slide_id, "reason": reason})
        return None
    return Slide(
        slide.slide_id,
        slide.patient_id,
        slide.pap_group,
        x_nm=entry.x_nm,
        y=entry.y,
        fields_used=len(per_field) - len(rejected),
        fields_rejected=len(rejected),
        study=study_values(slide.rows[0]),
    )


# --- precomputed spectra and images ---------------------------------------------------------


def _load_numeric(path: Path) -> F64:
    if path.suffix.lower() == ".npy":
        return np.asarray(np.load(path, allow_pickle=False), dtype=np.float64)
    text = path.read_text(encoding="utf-8")
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if lines and not _is_numeric_line(lines[0]):
        lines = lines[1:]  # a header line
    rows = [[float(v) for v in ln.replace(";", ",").split(",")] for ln in lines]
    return np.asarray(rows, dtype=np.float64)


def _is_numeric_line(line: str) -> bool:
    try:
        [float(v) for v in line.replace(";", ",").split(",")]
    except ValueError:
        return False
    return True


def load_spectrum_file(path: Path, params: Params) -> tuple[F64, F64]:
    """(x_nm, y) from a ``.npy``/``.csv`` file holding ``y`` or ``x, y`` (rows or columns)."""
    try:
        arr = _load_numeric(path)
    except (OSError, ValueError) as exc:
        raise DataError(f"{path.name}: not a readable spectrum ({exc})") from exc
    if arr.ndim == 2 and 1 in arr.shape:
        arr = arr.ravel()
    if arr.ndim == 1:
        x = axis_nm(params)
        if arr.size != x.size:
            raise DataError(
                f"{path.name}: {arr.size} values but {params.algorithm} has {x.size} bins "
                "(give x,y or matching spectrum parameters)"
            )
        x_nm, y = x, arr
    elif arr.ndim == 2 and 2 in arr.shape:
        pair = arr if arr.shape[0] == 2 else arr.T
        x_nm, y = pair[0], pair[1]
        axis = axis_nm(params)
        if x_nm.shape != axis.shape or not np.allclose(x_nm, axis, rtol=0.0, atol=1e-6):
            raise DataError(
                f"{path.name}: its x axis ({x_nm.size} points, {x_nm[0]:g}…{x_nm[-1]:g} nm) is "
                f"not the axis of {params.algorithm} with these parameters ({axis.size} points, "
                f"{axis[0]:g}…{axis[-1]:g} nm); the device computes the latter"
            )
    else:
        raise DataError(f"{path.name}: expected y or x,y, got an array of shape {arr.shape}")
    if not (np.all(np.isfinite(x_nm)) and np.all(np.isfinite(y))):
        raise DataError(f"{path.name}: non-finite values")
    if x_nm.size < 2 or not bool(np.all(np.diff(x_nm) > 0)):
        raise DataError(f"{path.name}: x must be strictly increasing with at least 2 points")
    return x_nm, y


def _slide_from_spectrum(root: Path, slide: _SlideRows, params: Params) -> Slide:
    row = slide.rows[0]
    try:
        x_nm, y = load_spectrum_file(root / row.values["spectrum"], params)
    except DataError as exc:
        raise DataError(f"line {row.line}: {exc}") from exc
    return Slide(
        slide.slide_id, slide.patient_id, slide.pap_group, x_nm=x_nm, y=y, study=study_values(row)
    )


def _slide_from_image(root: Path, slide: _SlideRows) -> Slide:
    row = slide.rows[0]
    try:
        image = read_rgb(root / row.values["image"])
    except InputError as exc:
        raise DataError(f"line {row.line}: {exc}") from exc
    return Slide(
        slide.slide_id, slide.patient_id, slide.pap_group, image=image, study=study_values(row)
    )


# --- entry point ---------------------------------------------------------------------------


def load_dataset(
    root: str | Path,
    params: Params,
    *,
    thresholds: QCThresholds | None = None,
    cache_dir: str | Path | None = None,
    max_slides: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    allow_lossy: bool = False,
) -> Dataset:
    """Read a dataset directory and compute (or load) one spectrum per slide.

    ``cache_dir`` None disables the spectrum cache.  ``max_slides`` keeps the first M slides in
    manifest order.  Slides whose every field fails QC are excluded and listed in the stats.
    """
    root = Path(root)
    kind, slide_rows, digest = read_manifest(root, allow_lossy=allow_lossy)
    if max_slides is not None:
        if max_slides < 1:
            raise DataError(f"--max-slides must be >= 1, got {max_slides}")
        slide_rows = slide_rows[:max_slides]
    thresholds = thresholds or QCThresholds()
    cache = Path(cache_dir) if cache_dir is not None else None
    stats = PrepStats(slides_in_manifest=len(slide_rows))
    slides: list[Slide] = []
    for i, sr in enumerate(slide_rows):
        slide = _load_slide(
            root, kind, sr, params=params, thresholds=thresholds, cache=cache, stats=stats
        )
        if slide is not None:
            slides.append(slide)
        if progress is not None:
            progress(i + 1, len(slide_rows))
    stats.slides_used = len(slides)
    _log_stats(kind, stats, cache)
    if not slides:
        raise DataError(f"{root}: no usable slides (every slide failed quality control)")
    files = files_digest(root, kind, slide_rows, digest)
    return Dataset(root, kind, tuple(slides), digest, params, stats, files, thresholds)


def files_digest(root: Path, kind: Kind, slide_rows: Sequence[_SlideRows], manifest: str) -> str:
    """sha256 over the manifest's hash and (path, sha256) of every data file of these slides."""
    cols = [c for c in KIND_COLUMNS[kind] if c != "field"]
    h = hashlib.sha256(f"manifest.csv {manifest}\n".encode())
    for sr in slide_rows:
        for row in sr.rows:
            for c in cols:
                rel = row.values[c]
                h.update(f"{rel} {sha256_path(root / rel)}\n".encode())
    return h.hexdigest()


def _load_slide(
    root: Path,
    kind: Kind,
    sr: _SlideRows,
    *,
    params: Params,
    thresholds: QCThresholds,
    cache: Path | None,
    stats: PrepStats,
) -> Slide | None:
    if kind == "fields":
        return _slide_from_fields(
            root, sr, params=params, thresholds=thresholds, cache_dir=cache, stats=stats
        )
    if kind == "spectra":
        return _slide_from_spectrum(root, sr, params)
    return _slide_from_image(root, sr)


def _log_stats(kind: Kind, stats: PrepStats, cache: Path | None) -> None:
    if kind != "fields":
        log.info("dataset: %d slides of precomputed %s", stats.slides_used, kind)
        return
    reasons = ", ".join(f"{r} {n}" for r, n in stats.rejected_by_reason.items())
    log.info(
        "spectra: %d slides, %d computed, %d from cache%s; fields: %d used, %d rejected by QC%s",
        stats.slides_used,
        stats.cache_misses,
        stats.cache_hits,
        f" ({cache})" if cache is not None else " (cache off)",
        stats.fields_used,
        stats.fields_rejected,
        f" ({reasons})" if reasons else "",
    )
    for ex in stats.slides_excluded:
        log.warning("slide %s excluded: %s", ex["slide_id"], ex["reason"])
