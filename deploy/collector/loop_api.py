"""The data loop's HTTP endpoints (an APIRouter of its own, included by :mod:`api`).

No ``from __future__ import annotations``: FastAPI must see the ``Depends`` objects.

* ``GET /api/performance?model=&version=&device=&since=&until=`` -- figures of
  :mod:`deploy.collector.performance` (viewer);
* ``GET /api/dataset?since=&until=&device=&reviewed_only=&qa_sample_only=`` -- the rows
  ``omis dataset export --api`` writes (viewer);
* ``PUT /api/study/{slide_id}`` -- a slide's study fields: patient, site, reference standard
  (operator and above).
"""

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import APIRouter, HTTPException, Query
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import Engine
from sqlalchemy.dialects import postgresql, sqlite

from deploy.collector.auth import Principal
from deploy.collector.performance import (
    Baseline,
    Limits,
    PerformanceQuery,
    load_baselines,
    performance,
)
from deploy.collector.store import parse_time, utcnow
from deploy.collector.tables import study_slides

# roles that may change the archive's records (review's roles, once they land, rank above)
WRITER_ROLES = frozenset({"operator", "cytotech", "pathologist", "admin"})


@dataclass
class LoopSettings:
    """What the endpoints need besides the read engine."""

    writer: Engine | None = None
    baselines: dict[tuple[str, int], Baseline] = field(default_factory=dict)
    limits: Limits = field(default_factory=Limits)

    @classmethod
    def from_config(cls, config: Any, writer: Engine | None) -> "LoopSettings":
        """From the collector's ``performance`` section."""
        perf = config.performance
        return cls(
            writer,
            load_baselines(Path(p) for p in perf.bundles),
            Limits(perf.alpha, perf.min_n, perf.psi_limit, perf.centroid_limit_sd),
        )


class StudyIn(BaseModel):
    """A slide's study fields."""

    model_config = ConfigDict(extra="forbid")

    patient_id: str | None = Field(None, min_length=1, max_length=128)
    site: str | None = Field(None, max_length=128)
    reference: Literal["cytology", "histology"] = "cytology"


def _time(name: str, text: str | None) -> datetime | None:
    if text is None:
        return None
    try:
        return parse_time(text)
    except ValueError as exc:
        raise HTTPException(422, f"{name}: not an RFC 3339 time with a zone: {text!r}") from exc


def loop_router(reader: Engine, settings: LoopSettings, viewer: Any) -> APIRouter:
    """The router over ``reader`` (and ``settings.writer`` for the one write)."""
    router = APIRouter()

    @router.get("/api/performance", summary="the device's calls against the lab's verdicts")
    def get_performance(
        _who: Annotated[Principal, viewer],
        model: Annotated[str | None, Query(max_length=128)] = None,
        version: Annotated[int | None, Query(ge=1)] = None,
        device: Annotated[str | None, Query(max_length=64)] = None,
        since: Annotated[str | None, Query(description="RFC 3339")] = None,
        until: Annotated[str | None, Query(description="RFC 3339")] = None,
    ) -> dict[str, Any]:
        query = PerformanceQuery(
            model, version, device, _time("since", since), _time("until", until)
        )
        return performance(reader, query, settings.baselines, settings.limits)

    @router.get("/api/dataset", summary="signed-out slides with spectra (omis dataset export)")
    def get_dataset(
        _who: Annotated[Principal, viewer],
        since: str | None = None,
        until: str | None = None,
        device: Annotated[str | None, Query(max_length=64)] = None,
        reviewed_only: bool = True,
        qa_sample_only: bool = False,
    ) -> dict[str, Any]:
        from deploy.dataset_export import ExportQuery, select_slides

        query = ExportQuery(
            _time("since", since), _time("until", until), device, reviewed_only, qa_sample_only
        )
        return select_slides(reader, query).to_json()

    @router.put("/api/study/{slide_id}", summary="a slide's patient, site and reference standard")
    def put_study(
        who: Annotated[Principal, viewer], slide_id: str, body: StudyIn
    ) -> dict[str, Any]:
        if who.role not in WRITER_ROLES:
            raise HTTPException(403, f"role {who.role!r} may not change study records")
        _upsert_study(settings.writer or reader, slide_id, body)
        return {"slide_id": slide_id, **body.model_dump()}

    return router


def _upsert_study(engine: Engine, slide_id: str, body: StudyIn) -> None:
    values = {"slide_id": slide_id, **body.model_dump(), "updated_at": utcnow()}
    dialect: Callable[..., Any] = (
        postgresql.insert if engine.dialect.name == "postgresql" else sqlite.insert
    )
    stmt = dialect(study_slides).values(**values)
    stmt = stmt.on_conflict_do_update(
        index_elements=["slide_id"], set_={k: v for k, v in values.items() if k != "slide_id"}
    )
    with engine.begin() as conn:
        conn.execute(stmt)
