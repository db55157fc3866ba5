"""Write a synthetic OMIS dataset: W/P image pairs per field, ``manifest.csv``, ``dataset.json``.

Layout (paths in the manifest are relative to the dataset directory)::

    DIR/dataset.json                      generator, seed, config, counts (no timestamps)
    DIR/manifest.csv                      one row per field
    DIR/<slide_id>/field-000-diffuse.png
    DIR/<slide_id>/field-000-polarized.png

The directory is built under a temporary sibling name and renamed into place only when
complete, so a crash or Ctrl-C never leaves a half-written dataset.  Output is byte-identical
for the same arguments, whatever the number of workers.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import multiprocessing
import os
import re
import secrets
import shutil
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Executor, ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
from pydantic import ValidationError

from firmware_bridge.exceptions import InputError
from firmware_bridge.fsutil import atomic_write_text, remove_stale_partials
from firmware_bridge.images import write_png
from firmware_bridge.limits import MAX_FIELDS, MAX_SLIDES, check_count
from firmware_bridge.sim.sample import (
    GENERATOR_VERSION,
    PAP_GROUPS,
    RISK,
    SimConfig,
    check_group,
    check_size,
    scale_counts,
    slide_for,
)
from firmware_bridge.validation import first_error

log = logging.getLogger(__name__)

SCHEMA = "omis.synth/1"
MANIFEST_COLUMNS = (
    "slide_id",
    "patient_id",
    "pap_group",
    "risk",
    "field",
    "diffuse",
    "polarized",
    "x_um",
    "y_um",
    "fault",
)
PNG_COMPRESSION = 1  # noisy images barely compress; level 1 is ~2x faster than the default
PATIENT_GROUPING = "one slide per patient (patient_id = 'P' + the slide id)"
# Named difficulties: each maps to SimConfig knobs (docs/simulator.md, "Difficulty presets").
# ``study``: calibrated so that ``omis train --preset tiny`` on 441 slides lands near the
# study's sensitivity 83.3 %, specificity 78 %, accuracy 80.4 % (measured numbers in the docs).
DIFFICULTY_PRESETS: dict[str, dict[str, float]] = {
    "default": {"difficulty": 1.0},
    "study": {"difficulty": 1.25},
}
_SIZE_RE = re.compile(r"^\s*(\d+)\s*[xX×]\s*(\d+)\s*$")

Progress = Callable[[int, int], None]
Row = dict[str, str]


@dataclass(frozen=True)
class SynthRequest:
    """What to generate; validated by :func:`synthesize`."""

    out: Path
    slides: int
    seed: int = 0
    fields: int = 5
    size: tuple[int, int] = (1280, 1024)
    groups: dict[str, float] | None = None
    config: SimConfig = field(default_factory=SimConfig)
    workers: int = 1
    difficulty_preset: str | None = None


@dataclass(frozen=True)
class SynthResult:
    """What was written."""

    out: Path
    slides: int
    fields: int
    images: int
    counts: dict[str, int]
    seconds: float

    def to_json(self) -> dict[str, Any]:
        """The object printed by ``omis dataset synth --json``."""
        return {
            "out": str(self.out),
            "slides": self.slides,
            "fields": self.fields,
            "images": self.images,
            "counts": self.counts,
            "seconds": round(self.seconds, 3),
            "manifest": str(self.out / "manifest.csv"),
        }


def parse_size(text: str) -> tuple[int, int]:
    """Parse ``WIDTHxHEIGHT`` (e.g. ``1280x1024``)."""
    m = _SIZE_RE.match(text)
    if not m:
        raise InputError(f"bad size {text!r}: expected WIDTHxHEIGHT, e.g. 1280x1024")
    return check_size((int(m.group(1)), int(m.group(2))))


def parse_groups(text: str) -> dict[str, float]:
    """Parse ``II=141,III=112,...`` into group weights (scaled to the number of slides)."""
    weights: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, value = part.partition("=")
        name = name.strip()
        if not sep:
            raise InputError(f"bad --groups entry {part!r}: expected GROUP=COUNT, e.g. II=141")
        check_group(name)
        try:
            weights[name] = float(value)
        except ValueError:
            raise InputError(f"bad --groups entry {part!r}: {value!r} is not a number") from None
        if not weights[name] >= 0:
            raise InputError(f"bad --groups entry {part!r}: the count must be >= 0")
    if not weights:
        raise InputError("--groups is empty: expected e.g. II=141,III=112,IV=42,V=146")
    return weights


def parse_difficulty(text: str) -> tuple[dict[str, float], str | None]:
    """``--difficulty``: a number, or a preset name; returns the SimConfig knobs and the preset."""
    name = text.strip()
    if name in DIFFICULTY_PRESETS:
        return dict(DIFFICULTY_PRESETS[name]), name
    try:
        value = float(name)
    except ValueError:
        presets = ", ".join(DIFFICULTY_PRESETS)
        raise InputError(
            f"bad --difficulty {text!r}: expected a number (0-5) or a preset ({presets})"
        ) from None
    return {"difficulty": value}, None


def make_config(**knobs: Any) -> SimConfig:
    """A :class:`SimConfig` from keyword knobs, with pydantic errors as one-line InputErrors."""
    try:
        return SimConfig(**knobs)
    except ValidationError as exc:
        raise InputError(f"bad simulator setting {first_error(exc, 'config')}") from exc


def check_request(req: SynthRequest) -> dict[str, int]:
    """Validate ``req`` (one-line InputErrors); returns the slides per Pap group."""
    check_count(req.slides, "--slides", MAX_SLIDES)
    check_count(req.fields, "--fields", MAX_FIELDS)
    if req.seed < 0:
        raise InputError(f"--seed must be >= 0, got {req.seed}")
    if req.workers < 1:
        raise InputError(f"--workers must be >= 1, got {req.workers}")
    check_size(req.size)
    if req.difficulty_preset is not None:
        _check_preset(req.difficulty_preset, req.config)
    if req.out.exists() and (not req.out.is_dir() or any(req.out.iterdir())):
        raise InputError(f"{req.out} already exists and is not an empty directory")
    return scale_counts(req.slides, req.groups)


def _check_preset(name: str, config: SimConfig) -> None:
    """A recorded preset must be known and agree with the config it claims to have set."""
    if name not in DIFFICULTY_PRESETS:
        raise InputError(
            f"unknown difficulty preset {name!r} (known: {', '.join(DIFFICULTY_PRESETS)})"
        )
    knobs = config.model_dump()
    wrong = {k: v for k, v in DIFFICULTY_PRESETS[name].items() if knobs[k] != v}
    if wrong:
        raise InputError(f"difficulty preset {name!r} needs {wrong}, the config differs")


@dataclass(frozen=True)
class _SlideJob:
    """Everything a worker process needs to render one slide (picklable)."""

    index: int
    seed: int
    counts: dict[str, int]
    config: SimConfig
    fields: int
    size: tuple[int, int]
    root: str


def _render_slide(job: _SlideJob) -> list[Row]:
    """Render and write every field of one slide (runs in a worker process)."""
    slide = slide_for(job.index, job.seed, job.counts, job.config)
    root, size = Path(job.root), job.size
    sid = slide.slide_id
    (root / sid).mkdir()
    rows: list[Row] = []
    for k, (x, y) in enumerate(slide.field_positions(job.fields)):
        w, p = slide.render_pair(x, y, size)
        names = (f"{sid}/field-{k:03d}-diffuse.png", f"{sid}/field-{k:03d}-polarized.png")
        for name, img in zip(names, (w, p), strict=True):
            write_png(root / name, img, PNG_COMPRESSION)
        rows.append(
            {
                "slide_id": sid,
                "patient_id": f"P{sid}",
                "pap_group": slide.pap_group,
                "risk": RISK[slide.pap_group],
                "field": str(k),
                "diffuse": names[0],
                "polarized": names[1],
                "x_um": f"{x:.1f}",
                "y_um": f"{y:.1f}",
                "fault": slide.field_fault(x, y),
            }
        )
    return rows


def _worker_init() -> None:
    # one OpenCV thread per process: the pool already uses every core
    cv2.setNumThreads(1)


@contextlib.contextmanager
def _executor(workers: int) -> Iterator[Executor | None]:
    if workers == 1:
        yield None
        return
    # spawn, not fork: the parent may run a progress-bar thread while the pool starts
    ctx = multiprocessing.get_context("spawn")
    pool = ProcessPoolExecutor(workers, mp_context=ctx, initializer=_worker_init)
    try:
        yield pool
    except BaseException:
        # on an error or Ctrl-C, do not render the slides still queued
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown(wait=True)


def _render_all(
    req: SynthRequest, counts: dict[str, int], root: Path, progress: Progress | None
) -> list[Row]:
    jobs = [
        _SlideJob(i, req.seed, counts, req.config, req.fields, req.size, str(root))
        for i in range(req.slides)
    ]
    done: dict[int, list[Row]] = {}
    with _executor(req.workers) as pool:
        if pool is None:
            for job in jobs:
                done[job.index] = _render_slide(job)
                if progress:
                    progress(len(done), req.slides)
        else:
            futures = {pool.submit(_render_slide, job): job.index for job in jobs}
            for fut in as_completed(futures):
                done[futures[fut]] = fut.result()
                if progress:
                    progress(len(done), req.slides)
    return [row for i in range(req.slides) for row in done[i]]


def _manifest_text(rows: list[Row]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=MANIFEST_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def _description(req: SynthRequest, counts: dict[str, int]) -> dict[str, Any]:
    return {
        "schema": SCHEMA,
        "generator": GENERATOR_VERSION,
        "seed": req.seed,
        "slides": req.slides,
        "fields_per_slide": req.fields,
        "size": list(req.size),
        "counts": {g: counts[g] for g in PAP_GROUPS},
        "risk": dict(RISK),
        "patients": PATIENT_GROUPING,
        "config": req.config.model_dump(),
        "difficulty_preset": req.difficulty_preset,
        "manifest": "manifest.csv",
        "manifest_columns": list(MANIFEST_COLUMNS),
    }


def synthesize(req: SynthRequest, progress: Progress | None = None) -> SynthResult:
    """Generate the dataset described by ``req``; ``progress(done, total)`` is called per slide."""
    counts = check_request(req)
    start = time.perf_counter()
    out = req.out
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(out)  # left by a SIGKILLed run
    # a plain mkdir (not mkdtemp, which forces mode 0700) so the dataset gets the umask's mode
    tmp = out.parent / f".{out.name}.{os.getpid()}.{secrets.token_hex(4)}.partial"
    tmp.mkdir()
    try:
        rows = _render_all(req, counts, tmp, progress)
        desc = (
            json.dumps(_description(req, counts), indent=2, sort_keys=True, allow_nan=False) + "\n"
        )
        atomic_write_text(tmp / "dataset.json", desc)
        atomic_write_text(tmp / "manifest.csv", _manifest_text(rows))
        # replaces an empty directory at ``out``; a non-empty one was refused above
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    seconds = time.perf_counter() - start
    log.info("wrote %d slides x %d fields to %s in %.1f s", req.slides, req.fields, out, seconds)
    return SynthResult(out, req.slides, req.fields, 2 * len(rows), counts, seconds)
