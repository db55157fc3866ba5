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
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import APIRouter, HTTPException
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import Engine
from sqlalchemy.dialects import postgresql, sqlite

from deploy.collector.api_models import problem
from deploy.collector.auth import Principal
from deploy.collector.http_params import (
    SLIDE_CHARS,
    DeviceFilter,
    QueryTime,
    int_query,
    text_path,
    text_query,
    time_query,
)
from deploy.collector.performance import (
    Baseline,
    Limits,
    PerformanceQuery,
    load_baselines,
    performance,
)
from deploy.collector.store import utcnow
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


MODEL_CHARS = 128  # results.model_name column
MAX_VERSION = 2**31 - 1  # results.model_version is a 32-bit integer
SlideId = Annotated[str, text_path(SLIDE_CHARS, "the slide's id")]


def loop_router(reader: Engine, settings: LoopSettings, viewer: Any) -> APIRouter:
    """The router over ``reader`` (and ``settings.writer`` for the one write)."""
    router = APIRouter()

    @router.get("/api/performance", summary="the device's calls against the lab's verdicts")
    def get_performance(
        _who: Annotated[Principal, viewer],
        model: Annotated[str | None, text_query(MODEL_CHARS, "model name")] = None,
        version: Annotated[int | None, int_query(1, MAX_VERSION, "model version")] = None,
        device: DeviceFilter = None,
        since: Annotated[QueryTime, time_query("finished at or after")] = None,
        until: Annotated[QueryTime, time_query("finished before")] = None,
    ) -> dict[str, Any]:
        query = PerformanceQuery(model, version, device, since, until)
        return performance(reader, query, settings.baselines, settings.limits)

    @router.get("/api/dataset", summary="signed-out slides with spectra (omis dataset export)")
    def get_dataset(
        _who: Annotated[Principal, viewer],
        since: Annotated[QueryTime, time_query("finished at or after")] = None,
        until: Annotated[QueryTime, time_query("finished before")] = None,
        device: DeviceFilter = None,
        reviewed_only: bool = True,
        qa_sample_only: bool = False,
    ) -> dict[str, Any]:
        from deploy.dataset_export import ExportQuery, select_slides

        query = ExportQuery(since, until, device, reviewed_only, qa_sample_only)
        return select_slides(reader, query).to_json()

    @router.put(
        "/api/study/{slide_id}",
        summary="a slide's patient, site and reference standard",
        responses=problem(403, "role too low (operator and above)"),
    )
    def put_study(
        who: Annotated[Principal, viewer], slide_id: SlideId, body: StudyIn
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
