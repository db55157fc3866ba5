"""Replay recorded field pairs as if a microscope were taking them (``replay://DIR``).

Two layouts are understood:

* a directory written by ``omis acquire``: ``acquisition.json`` listing
  ``field-NNN-diffuse.png`` / ``field-NNN-polarized.png`` with their stage positions;
* a dataset written by ``omis dataset synth``: ``manifest.csv`` with at least
  ``slide_id,patient_id,pap_group,field,diffuse,polarized`` (paths relative to the directory);
  ``?slide=ID`` picks the slide, else the first slide in the manifest is replayed.
"""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from firmware_bridge.acquisition import (
    AcquisitionSettings,
    FieldPair,
    QualityCheck,
    ScanPlan,
    make_plan,
    utc_now,
)
from firmware_bridge.base import Position
from firmware_bridge.exceptions import InputError
from firmware_bridge.images import read_rgb
from firmware_bridge.microscope_base import Microscope

log = logging.getLogger(__name__)

MANIFEST_COLUMNS = ("slide_id", "field", "diffuse", "polarized")


@dataclass(frozen=True)
class ReplayField:
    """One recorded field: its image files and, when recorded, its stage position."""

    index: int
    diffuse: Path
    polarized: Path
    position: Position | None = None


class ReplayMicroscope(Microscope):
    """Yields recorded pairs in their recorded order; no hardware involved."""

    def __init__(
        self, url: str, root: Path, fields: list[ReplayField], info: dict[str, Any]
    ) -> None:
        super().__init__(url)
        self.root = root
        self.fields = fields
        self.info = info

    @classmethod
    def from_dir(cls, url: str, path: str | Path, *, slide: str | None = None) -> ReplayMicroscope:
        """Read the directory's index (``acquisition.json`` or ``manifest.csv``)."""
        root = Path(path)
        if not root.is_dir():
            raise InputError(f"{url}: {root} is not a directory")
        if (root / "acquisition.json").is_file():
            fields, info = _from_acquisition(root, slide)
        elif (root / "manifest.csv").is_file():
            fields, info = _from_manifest(root, slide)
        else:
            raise InputError(f"{url}: {root} has neither acquisition.json nor manifest.csv")
        if not fields:
            raise InputError(f"{url}: no fields recorded in {root}")
        return cls(url, root, fields, info)

    def slide_ids(self) -> list[str]:
        """Every slide id in the directory (one for ``omis acquire`` output)."""
        return list(self.info.get("slides", [self.info.get("slide_id")]))

    def describe(self) -> dict[str, Any]:
        """Kind, URL, source directory and what was recorded about the original acquisition."""
        return {"kind": "replay", "url": self.url, "source": str(self.root), **self.info}

    def default_plan(self, fields: int, pattern: str = "serpentine") -> ScanPlan:
        """A plan of ``fields`` fields (the recorded order is always kept)."""
        return make_plan(fields=min(fields, len(self.fields)), pattern=pattern)

    def _acquire(
        self, plan: ScanPlan, settings: AcquisitionSettings, qc: QualityCheck | None
    ) -> Iterator[FieldPair]:
        if plan.fields > len(self.fields):
            raise InputError(
                f"{self.url}: {plan.fields} fields asked for, only {len(self.fields)} recorded"
            )
        planned = plan.positions()
        for k, rec in enumerate(self.fields[: plan.fields]):
            started = utc_now()
            pair = FieldPair(
                index=k,
                position=rec.position or planned[k],
                diffuse=read_rgb(rec.diffuse),
                polarized=read_rgb(rec.polarized),
                timestamps={"started": started, "finished": utc_now()},
                timings_ms={},
                reported_position=rec.position,
            )
            if pair.diffuse.shape != pair.polarized.shape:
                raise InputError(f"{rec.diffuse} and {rec.polarized} differ in size")
            if qc is not None:
                verdict = qc(pair)
                pair.qc = dict(verdict) if verdict is not None else None
            yield pair

    def _close(self) -> None:
        pass


def _from_acquisition(root: Path, slide: str | None) -> tuple[list[ReplayField], dict[str, Any]]:
    index = root / "acquisition.json"
    try:
        meta = json.loads(index.read_text(encoding="utf-8"))
        records = meta["fields"]
        fields = [
            ReplayField(
                int(rec["index"]),
                root / rec["diffuse"],
                root / rec["polarized"],
                Position(*rec["position_um"]) if rec.get("position_um") else None,
            )
            for rec in records
        ]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InputError(f"{index}: not a readable acquisition record ({exc})") from exc
    source = meta.get("microscope", {})
    recorded_slide = source.get("simulation", {}).get("slide_id")
    if slide is not None and slide != recorded_slide:
        raise InputError(
            f"{index}: slide {slide!r} asked for, the recording is of {recorded_slide!r}"
        )
    info = {
        "format": "acquisition",
        "slide_id": recorded_slide,
        "recorded": {k: source.get(k) for k in ("kind", "url", "firmware", "camera", "simulation")},
    }
    return sorted(fields, key=lambda f: f.index), info


def _from_manifest(root: Path, slide: str | None) -> tuple[list[ReplayField], dict[str, Any]]:
    manifest = root / "manifest.csv"
    try:
        with manifest.open(newline="", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh))
    except (OSError, csv.Error, UnicodeDecodeError) as exc:
        raise InputError(f"{manifest}: cannot read ({exc})") from exc
    missing = [c for c in MANIFEST_COLUMNS if rows and c not in rows[0]]
    if not rows or missing:
        raise InputError(f"{manifest}: empty or missing columns {missing}")
    slides = list(dict.fromkeys(row["slide_id"] for row in rows))
    chosen = slide if slide is not None else slides[0]
    if chosen not in slides:
        raise InputError(f"{manifest}: no slide {chosen!r}; slides: {', '.join(slides[:20])}")
    if slide is None and len(slides) > 1:
        log.info(
            "%s: replaying slide %s (first of %d); pick with ?slide=ID", root, chosen, len(slides)
        )
    mine = [row for row in rows if row["slide_id"] == chosen]
    try:
        fields = [
            ReplayField(int(row["field"]), root / row["diffuse"], root / row["polarized"])
            for row in mine
        ]
    except ValueError as exc:
        raise InputError(f"{manifest}: bad field number ({exc})") from exc
    info = {
        "format": "manifest",
        "slide_id": chosen,
        "slides": slides,
        "pap_group": mine[0].get("pap_group"),
        "patient_id": mine[0].get("patient_id"),
    }
    return sorted(fields, key=lambda f: f.index), info
