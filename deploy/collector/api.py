"""The collector's HTTP API (FastAPI): results with filters and paging, CSV, FHIR, devices, alerts.

OpenAPI is served at ``/api/openapi.json`` (browsable at ``/api/docs``).  Every endpoint needs
at least the ``viewer`` role; unauthenticated requests are accepted from localhost only (see
:mod:`deploy.collector.auth`).  Login, the worklist, reviews, alerts and the audit trail are
:mod:`deploy.collector.review_api`'s router.  The dashboard's static files are served at ``/``.
"""

import csv
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, HTTPException, Query
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from sqlalchemy import Engine

from deploy import __version__
from deploy.collector.auth import Authenticator, Principal, UserStore
from deploy.collector.config import HttpConfig, ReviewConfig
from deploy.collector.dashboard_settings import add_dashboard_settings
from deploy.collector.fhir import diagnostic_bundle
from deploy.collector.queries import LIST_COLUMNS, ArchiveQueries, ResultFilter
from deploy.collector.review import Worklist, report_status
from deploy.collector.review_api import (
    ReviewContext,
    build_router,
    known_id,
    principal_dependency,
    require,
    validation_error,
)
from deploy.collector.store import parse_time

CSV_COLUMNS = [c.name for c in LIST_COLUMNS]


def _time(name: str, text: str | None) -> Any:
    if text is None:
        return None
    try:
        return parse_time(text)
    except ValueError as exc:
        raise HTTPException(400, f"{name}: not an RFC 3339 time with a zone: {text!r}") from exc


def result_filter(
    *,
    device: Annotated[str | None, Query(description="device id")] = None,
    since: Annotated[str | None, Query(description="finished at or after (RFC 3339)")] = None,
    until: Annotated[str | None, Query(description="finished before (RFC 3339)")] = None,
    outcome: Annotated[
        Literal["classified", "abstained", "failed", "cancelled"] | None, Query()
    ] = None,
    risk: Annotated[Literal["low", "high"] | None, Query()] = None,
    review: Annotated[bool | None, Query(description="needs a person's review")] = None,
    slide: Annotated[str | None, Query(description="slide id contains (case-insensitive)")] = None,
) -> ResultFilter:
    """The shared filters of the result list and its CSV."""
    return ResultFilter(
        device, _time("since", since), _time("until", until), outcome, risk, review, slide
    )


def _csv_lines(rows: Iterator[dict[str, Any]]) -> Iterator[str]:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow(row)
        if buffer.tell() > 65536:
            yield buffer.getvalue()
            buffer.seek(0)
            buffer.truncate()
    yield buffer.getvalue()


def review_context(
    engine: Engine, config: HttpConfig, review: ReviewConfig | None = None
) -> ReviewContext:
    """Users, authenticator and worklist over the (writer) ``engine``."""
    users = UserStore(engine)
    auth = Authenticator(
        users,
        config.accounts,
        failures_per_minute=config.auth_failures_per_minute,
        kdf_concurrency=config.kdf_concurrency,
    )
    share = (review or ReviewConfig()).qc_sample_share
    return ReviewContext(users, auth, Worklist(engine, qc_sample_share=share), config)


def create_app(
    queries: ArchiveQueries,
    config: HttpConfig,
    dashboard: Path | None,
    *,
    engine: Engine | None = None,
    review: ReviewConfig | None = None,
    prefix: str = "omis/v1",
) -> FastAPI:
    """The ASGI application over ``queries``; writes (reviews, acks, sessions) go to ``engine``
    (default: ``queries.engine``)."""
    app = FastAPI(
        title="omis collect",
        version=__version__,
        description="The OMIS result archive (docs/collector.md).",
        openapi_url="/api/openapi.json",
        docs_url="/api/docs",
        redoc_url=None,
    )
    ctx = review_context(engine or queries.engine, config, review)
    viewer = require(principal_dependency(ctx), "viewer")
    page_limit = config.max_page
    app.include_router(build_router(ctx, page_limit))
    app.add_exception_handler(RequestValidationError, validation_error)

    @app.get("/api/results", summary="results, newest first, filtered and paged")
    def list_results(
        _who: Annotated[Principal, viewer],
        where: Annotated[ResultFilter, Depends(result_filter)],
        limit: Annotated[int, Query(ge=1, le=page_limit)] = 100,
        offset: Annotated[int, Query(ge=0)] = 0,
    ) -> dict[str, Any]:
        total, items = queries.list_results(where, limit, offset)
        return {"total": total, "limit": limit, "offset": offset, "items": items}

    @app.get("/api/results.csv", summary="the same list as CSV (every matching row)")
    def results_csv(
        _who: Annotated[Principal, viewer],
        where: Annotated[ResultFilter, Depends(result_filter)],
    ) -> StreamingResponse:
        headers = {"Content-Disposition": 'attachment; filename="omis-results.csv"'}
        lines = _csv_lines(queries.iter_results(where))
        return StreamingResponse(lines, media_type="text/csv; charset=utf-8", headers=headers)

    def stored(message_id: str) -> dict[str, Any]:
        found = queries.get_result(known_id(message_id))
        if found is None:
            raise HTTPException(404, f"no result {message_id!r}")
        return found

    @app.get("/api/results/{message_id}", summary="one result: the full payload and its row")
    def get_result(_who: Annotated[Principal, viewer], message_id: str) -> dict[str, Any]:
        found = stored(message_id)
        reviews = ctx.worklist.reviews_of(message_id)
        found["reviews"] = reviews
        found["verdict"] = reviews[-1] if reviews else None
        found["report_status"] = report_status(reviews)
        return found

    @app.get("/api/results/{message_id}/fhir", summary="one result as a FHIR R4 Bundle")
    def get_fhir(_who: Annotated[Principal, viewer], message_id: str) -> JSONResponse:
        body = diagnostic_bundle(stored(message_id), ctx.worklist.reviews_of(message_id))
        return JSONResponse(body, media_type="application/fhir+json")

    @app.get("/api/devices", summary="known devices with live state")
    def list_devices(_who: Annotated[Principal, viewer]) -> list[dict[str, Any]]:
        return queries.devices()

    if dashboard is not None:
        add_dashboard_settings(app, config, prefix)
        app.mount("/", StaticFiles(directory=dashboard, html=True), name="dashboard")
    return app
