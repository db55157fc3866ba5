"""``omis dataset export``: signed-out slides of the archive as a training directory.

The directory is what ``omis train`` and ``omis validate`` read as it is (docs/training.md):

* ``manifest.csv`` -- ``slide_id, patient_id, pap_group, spectrum`` and the study columns
  ``device_id, site, acquired_at, model_name, model_version, reference, bethesda, message_id``;
* ``spectra/NNNNN.csv`` -- the slide spectrum the device computed (``x_nm,y``, its own axis);
* ``excluded.csv`` -- every slide that matched the query but is not exported, with the reason
  (no verdict, unsatisfactory specimen, failed or cancelled scan, no spectrum);
* ``export.json`` -- the query, the source, the row count and ``sha256``: the same digest over the
  manifest and every spectrum file that training records as ``data_files_sha256``.

One row per slide: its newest result that carries a spectrum, labelled with the slide's current
verdict (latest amendment).  The directory is written beside ``--out`` under a temporary name and
renamed into place, so an error leaves nothing behind.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import json
import logging
import os
import shutil
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, select

from deploy.collector.queries import rfc3339
from deploy.collector.store import utcnow
from deploy.collector.tables import results
from deploy.collector.verdicts import (
    RESULT_COLUMNS,
    Study,
    default_study,
    latest_verdicts,
    spectra_of,
    study_of,
)
from deploy.exceptions import ArchiveError

log = logging.getLogger(__name__)

SCHEMA = "omis.dataset-export/1"
MANIFEST_COLUMNS = (
    "slide_id", "patient_id", "pap_group", "spectrum", "device_id", "site", "acquired_at",
    "model_name", "model_version", "reference", "bethesda", "message_id",
)  # fmt: skip
EXCLUDED_COLUMNS = ("slide_id", "message_id", "device_id", "outcome", "reason")


class ExportError(ArchiveError):
    """The export cannot be made (empty selection, contradictory verdicts, bad source)."""


@dataclass(frozen=True)
class ExportQuery:
    """Which slides to export."""

    since: datetime | None = None
    until: datetime | None = None
    device: str | None = None
    reviewed_only: bool = True
    qa_sample_only: bool = False

    def to_json(self) -> dict[str, Any]:
        """The query as recorded in ``export.json`` (times in RFC 3339)."""
        data = asdict(self)
        data["since"], data["until"] = rfc3339(self.since), rfc3339(self.until)
        return data


@dataclass
class Selection:
    """Exported rows (with their spectra) and excluded slides, in slide order."""

    rows: list[dict[str, Any]]
    excluded: list[dict[str, Any]]

    def to_json(self) -> dict[str, Any]:
        """Wire form of ``GET /api/dataset``."""
        return {"rows": self.rows, "excluded": self.excluded}


def _where(query: ExportQuery) -> list[Any]:
    c = results.c
    conditions: list[Any] = []
    if query.device is not None:
        conditions.append(c.device_id == query.device)
    if query.since is not None:
        conditions.append(c.finished_at >= query.since)
    if query.until is not None:
        conditions.append(c.finished_at < query.until)
    if query.qa_sample_only:
        # the quality-assurance sample: slides the device decided itself (not referred), whose
        # sign-out therefore does not depend on the device's call
        conditions.append(c.outcome == "classified")
    return conditions


def select_slides(engine: Engine, query: ExportQuery) -> Selection:
    """Read the archive: one exportable row per slide, and the excluded slides with reasons."""
    stmt = select(*RESULT_COLUMNS).where(*_where(query))
    stmt = stmt.order_by(results.c.finished_at, results.c.id)
    with engine.connect() as conn:
        rows = conn.execute(stmt).all()
        verdicts = latest_verdicts(conn)
        studies = study_of(conn)
        by_slide: dict[str, list[Any]] = {}
        for row in rows:
            by_slide.setdefault(row.slide_id, []).append(row)
        out = Selection([], [])
        chosen = [
            c
            for slide_id, scans in by_slide.items()
            if (c := _choose(scans, verdicts.get(slide_id), query, out)) is not None
        ]
        spectra = spectra_of(conn, [c.message_id for c in chosen])
    for row in chosen:
        spectrum = spectra.get(row.message_id)
        if spectrum is None:
            out.excluded.append(_excluded(row, "the result carries no spectrum"))
            continue
        study = studies.get(row.slide_id) or default_study(row.slide_id)
        out.rows.append(_export_row(row, verdicts.get(row.slide_id), study, spectrum))
    return out


def _excluded(row: Any, reason: str) -> dict[str, Any]:
    return {
        "slide_id": row.slide_id,
        "message_id": row.message_id,
        "device_id": row.device_id,
        "outcome": row.outcome,
        "reason": reason,
    }


def _choose(scans: list[Any], verdict: Any, query: ExportQuery, out: Selection) -> Any:
    """The slide's result to export (its newest with a spectrum), or None (listed as excluded)."""
    newest = scans[-1]
    usable = [r for r in scans if r.outcome in ("classified", "abstained")]
    if not usable:
        why = newest.outcome_reason or "no spectrum"
        out.excluded.append(_excluded(newest, f"{newest.outcome} scan: {why}"))
        return None
    if verdict is None and query.reviewed_only:
        out.excluded.append(_excluded(newest, "no verdict (not signed out)"))
        return None
    if verdict is not None and not verdict.satisfactory:
        out.excluded.append(_excluded(newest, "unsatisfactory specimen"))
        return None
    return usable[-1]


def _export_row(
    row: Any, verdict: Any, study: Study, spectrum: tuple[list[float], list[float]]
) -> dict[str, Any]:
    return {
        "slide_id": row.slide_id,
        "patient_id": study.patient_id,
        "patient_given": study.patient_given,
        "pap_group": verdict.pap_group if verdict is not None else "",
        "bethesda": verdict.bethesda if verdict is not None else "",
        "device_id": row.device_id,
        "site": study.site,
        "acquired_at": rfc3339(row.finished_at),
        "model_name": row.model_name or "",
        "model_version": "" if row.model_version is None else str(row.model_version),
        "reference": study.reference,
        "message_id": row.message_id,
        "axis": spectrum[0],
        "values": spectrum[1],
    }


# --- checks ----------------------------------------------------------------------------------


def check_selection(selection: Selection, source: str) -> None:
    """Refuse an empty export and a patient whose slides' verdicts disagree on the risk."""
    if not selection.rows:
        reasons: dict[str, int] = {}
        for ex in selection.excluded:
            reasons[ex["reason"]] = reasons.get(ex["reason"], 0) + 1
        detail = ", ".join(f"{n} {r}" for r, n in sorted(reasons.items())) or "no results"
        raise ExportError(f"{source}: nothing to export ({detail})")
    from deploy.collector.bethesda import pap_class

    def risk(bethesda: str) -> str:
        found = pap_class(bethesda)
        return found.risk if found is not None else "unknown"

    seen: dict[str, tuple[str, str]] = {}
    for row in selection.rows:
        if not row["bethesda"]:
            continue
        first = seen.setdefault(row["patient_id"], (row["slide_id"], row["bethesda"]))
        if risk(first[1]) != risk(row["bethesda"]):
            raise ExportError(
                f"patient {row['patient_id']!r}: contradictory verdicts, slide {first[0]!r} "
                f"{first[1]} ({risk(first[1])} risk) but slide {row['slide_id']!r} "
                f"{row['bethesda']} ({risk(row['bethesda'])} risk); amend one before exporting"
            )
    unlabelled = [r["slide_id"] for r in selection.rows if not r["pap_group"]]
    if unlabelled:
        raise ExportError(
            f"{len(unlabelled)} slide(s) have no verdict (e.g. {unlabelled[0]!r}); training "
            "needs one for every slide: keep --reviewed-only"
        )


# --- writing ---------------------------------------------------------------------------------


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _spectrum_csv(axis: Sequence[float], values: Sequence[float]) -> bytes:
    lines = ["x_nm,y"] + [f"{x!r},{y!r}" for x, y in zip(axis, values, strict=True)]
    return ("\n".join(lines) + "\n").encode("utf-8")


def _csv_bytes(columns: Sequence[str], rows: Sequence[dict[str, Any]]) -> bytes:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue().encode("utf-8")


def files_sha256(manifest: bytes, files: Sequence[tuple[str, bytes]]) -> str:
    """The digest training records as ``data_files_sha256`` (training/data.py files_digest)."""
    h = hashlib.sha256(f"manifest.csv {_sha256(manifest)}\n".encode())
    for rel, data in files:
        h.update(f"{rel} {_sha256(data)}\n".encode())
    return h.hexdigest()


def write_export(
    selection: Selection, out: Path, query: ExportQuery, source: str
) -> dict[str, Any]:
    """Write the directory atomically (temp dir + rename); returns ``export.json``."""
    check_selection(selection, source)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"--out {out}: exists and is not empty")
    files: list[tuple[str, bytes]] = []
    manifest_rows = []
    for i, row in enumerate(selection.rows):
        rel = f"spectra/{i:05d}.csv"
        files.append((rel, _spectrum_csv(row["axis"], row["values"])))
        manifest_rows.append({**row, "spectrum": rel})
    manifest = _csv_bytes(MANIFEST_COLUMNS, manifest_rows)
    record = {
        "schema": SCHEMA,
        "source": source,
        "query": query.to_json(),
        "rows": len(manifest_rows),
        "excluded": len(selection.excluded),
        "patients": len({r["patient_id"] for r in manifest_rows}),
        "slides_without_patient": sum(1 for r in manifest_rows if not r["patient_given"]),
        "manifest_sha256": _sha256(manifest),
        "sha256": files_sha256(manifest, files),
        "created": rfc3339(utcnow()),
    }
    _write_dir(out, manifest, files, selection.excluded, record)
    return record


def _write_dir(
    out: Path,
    manifest: bytes,
    files: Sequence[tuple[str, bytes]],
    excluded: Sequence[dict[str, Any]],
    record: dict[str, Any],
) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        (tmp / "spectra").mkdir()
        for rel, data in files:
            (tmp / rel).write_bytes(data)
        (tmp / "manifest.csv").write_bytes(manifest)
        (tmp / "excluded.csv").write_bytes(_csv_bytes(EXCLUDED_COLUMNS, excluded))
        text = json.dumps(record, indent=2, allow_nan=False) + "\n"
        (tmp / "export.json").write_text(text, encoding="utf-8")
        if out.is_dir():
            out.rmdir()  # empty (checked); rename cannot replace a directory otherwise
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# --- sources ---------------------------------------------------------------------------------


def from_database(url: str, query: ExportQuery) -> Selection:
    """Select from the archive database at ``url``; reads only (no file created, no migration)."""
    from sqlalchemy import inspect
    from sqlalchemy.exc import SQLAlchemyError

    from deploy.collector.db import open_engine

    engine = open_engine(url, writer=False)
    try:
        database = engine.url.database
        if engine.dialect.name == "sqlite" and not (database and Path(database).is_file()):
            raise ExportError(f"--db {url}: no such archive database file")
        try:
            missing = {"results", "reviews", "study_slides"} - set(
                inspect(engine).get_table_names()
            )
            if missing:
                raise ExportError(
                    f"--db {url}: not an archive at the current schema (no table "
                    f"{', '.join(sorted(missing))}); start omis collect on it once to migrate"
                )
            return select_slides(engine, query)
        except SQLAlchemyError as exc:
            raise ExportError(f"--db {url}: {exc}") from exc
    finally:
        engine.dispose()


def _auth_header(token: str) -> str:
    if ":" in token:  # user:password -> HTTP Basic (what programs use today)
        return "Basic " + base64.b64encode(token.encode("utf-8")).decode("ascii")
    return f"Bearer {token}"


def from_api(
    base: str, token: str | None, query: ExportQuery, timeout_s: float = 60.0
) -> Selection:
    """Select through a running archive's ``GET /api/dataset``."""
    if urllib.parse.urlsplit(base).scheme not in ("http", "https"):
        raise ExportError(f"--api {base}: not an http:// or https:// URL")
    params = {k: v for k, v in query.to_json().items() if v is not None}
    params = {k: (str(v).lower() if isinstance(v, bool) else v) for k, v in params.items()}
    url = base.rstrip("/") + "/api/dataset?" + urllib.parse.urlencode(params)
    request = urllib.request.Request(url, headers={"Accept": "application/json"})  # noqa: S310
    if token:
        request.add_header("Authorization", _auth_header(token))
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:  # noqa: S310
            body = json.loads(response.read())
    except urllib.error.HTTPError as exc:
        detail = exc.read(300).decode("utf-8", "replace")
        raise ExportError(f"--api {base}: HTTP {exc.code}: {detail}") from exc
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise ExportError(f"--api {base}: {exc}") from exc
    if not isinstance(body, dict) or "rows" not in body or "excluded" not in body:
        raise ExportError(f"--api {base}: not an omis archive dataset answer")
    return Selection(list(body["rows"]), list(body["excluded"]))
