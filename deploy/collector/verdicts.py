"""Results joined with the lab's verdicts: what the dataset export and performance read.

A result's verdict is its latest ``reviews`` row (an amendment is a newer row); performance
compares each result with its own verdict.  A slide's verdict, for the dataset export, is the
latest review of any of its results.  Study metadata
(patient, site, reference standard) comes from ``study_slides``; a slide without a patient is
its own patient (said so in every export, see :func:`study_of`).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, Select, func, select

from deploy.collector.bethesda import PapClass, pap_class
from deploy.collector.tables import results, reviews, study_slides

REFERENCES = ("cytology", "histology")


@dataclass(frozen=True)
class Verdict:
    """The current sign-out of one slide."""

    review_id: int
    message_id: str
    slide_id: str
    bethesda: str | None  # None: an unsatisfactory specimen needs no category
    adequacy: str
    user_name: str
    created_at: datetime

    @property
    def satisfactory(self) -> bool:
        """True when a diagnosis can be taken from it: a satisfactory specimen with a category."""
        return self.adequacy == "satisfactory" and self.bethesda is not None

    def _class(self) -> PapClass:
        found = pap_class(self.bethesda)
        if found is None:
            raise ValueError(f"slide {self.slide_id!r}: verdict without a Bethesda category")
        return found

    @property
    def pap_group(self) -> str:
        """Pap group of the Bethesda category (``ValueError`` without one)."""
        return self._class().pap_group

    @property
    def risk(self) -> str:
        """``high`` or ``low`` (``ValueError`` without a category)."""
        return self._class().risk


@dataclass(frozen=True)
class Study:
    """A slide's study fields."""

    patient_id: str
    site: str
    reference: str
    patient_given: bool


def latest_verdicts(
    conn: Connection, slide_ids: Iterable[str] | None = None, *, per: str = "slide_id"
) -> dict[str, Verdict]:
    """The current verdict of every reviewed slide (``per="slide_id"``: the latest review of
    any of its results) or result (``per="message_id"``: that result's latest review)."""
    key = reviews.c[per]
    newest = select(func.max(reviews.c.id)).group_by(key)
    query: Select[Any] = select(reviews).where(reviews.c.id.in_(newest))
    if slide_ids is not None:
        query = query.where(reviews.c.slide_id.in_(list(slide_ids)))
    out: dict[str, Verdict] = {}
    for row in conn.execute(query):
        out[getattr(row, per)] = Verdict(
            int(row.id),
            row.message_id,
            row.slide_id,
            row.bethesda,
            row.adequacy,
            row.user_name,
            row.created_at,
        )
    return out


def study_of(conn: Connection) -> dict[str, Study]:
    """Study fields of every slide that has them."""
    out: dict[str, Study] = {}
    for row in conn.execute(select(study_slides)):
        out[row.slide_id] = Study(
            row.patient_id or row.slide_id,
            row.site or "",
            row.reference or "cytology",
            bool(row.patient_id),
        )
    return out


def default_study(slide_id: str) -> Study:
    """A slide without study metadata: its own patient, no site, cytology as reference."""
    return Study(slide_id, "", "cytology", False)


def spectrum_of(payload: str) -> tuple[list[float], list[float]] | None:
    """(axis, values) of a stored result's slide spectrum, None when it has none."""
    data = json.loads(payload)
    spectrum = data.get("spectrum") or {}
    axis, values = spectrum.get("axis"), spectrum.get("values")
    if not isinstance(axis, list) or not isinstance(values, list) or not axis:
        return None
    if len(axis) != len(values):
        return None
    return [float(v) for v in axis], [float(v) for v in values]


PAYLOAD_CHUNK = 500


def spectra_of(
    conn: Connection, message_ids: Iterable[str]
) -> dict[str, tuple[list[float], list[float]]]:
    """The slide spectrum of each result that has one, read in chunks (payloads are large)."""
    ids = list(message_ids)
    out: dict[str, tuple[list[float], list[float]]] = {}
    for i in range(0, len(ids), PAYLOAD_CHUNK):
        chunk = ids[i : i + PAYLOAD_CHUNK]
        query = select(results.c.message_id, results.c.payload).where(
            results.c.message_id.in_(chunk)
        )
        for row in conn.execute(query):
            spectrum = spectrum_of(row.payload)
            if spectrum is not None:
                out[row.message_id] = spectrum
    return out


RESULT_COLUMNS = (
    results.c.message_id,
    results.c.device_id,
    results.c.slide_id,
    results.c.finished_at,
    results.c.outcome,
    results.c.outcome_reason,
    results.c.outcome_stage,
    results.c.review,
    results.c.risk,
    results.c.p_high,
    results.c.model_name,
    results.c.model_version,
    results.c.model_sha256,
)
