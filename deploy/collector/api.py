"""The collector's HTTP API (FastAPI): results with filters and paging, CSV, FHIR, devices, alerts.

OpenAPI is served at ``/api/openapi.json`` (browsable at ``/api/docs``), behind the same login as
the API.  Every endpoint needs at least the ``viewer`` role; unauthenticated requests are
accepted from localhost only (see :mod:`deploy.collector.auth`).  Login, the worklist, reviews,
alerts and the audit trail are :mod:`deploy.collector.review_api`'s router.  Every parameter is
bounded before it reaches SQL (:mod:`deploy.collector.http_params`); every response carries the
security headers of :mod:`deploy.collector.http_security`.  The dashboard's static files are
served at ``/`` when present.
"""

import csv
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, FastAPI, HTTPException, Query
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from sqlalchemy import Engine
from starlette.exceptions import HTTPException as StarletteHTTPException

from deploy import __version__
from deploy.collector.api_models import (
    NOT_FOUND,
    UNAUTHORIZED,
    Device,
    RejectedPage,
    ResultDetail,
    ResultPage,
)
from deploy.collector.auth import Authenticator, Principal, UserStore
from deploy.collector.commands_api import CommandSender
from deploy.collector.config import HttpConfig, ReviewConfig
from deploy.collector.dashboard_settings import add_dashboard_settings
from deploy.collector.fhir import diagnostic_bundle
from deploy.collector.fleet_api import fleet_router
from deploy.collector.http_params import (
    DeviceFilter,
    MessageId,
    Offset,
    Since,
    SlideFilter,
    Until,
    limit_query,
)
from deploy.collector.http_security import add_docs, add_edge_defences
from deploy.collector.loop_api import LoopSettings, loop_router
from deploy.collector.queries import LIST_COLUMNS, ArchiveQueries, ResultFilter
from deploy.collector.review import Worklist, report_status
from deploy.collector.review_api import (
    ReviewContext,
    body_error,
    build_router,
    known_id,
    principal_dependency,
    require,
    validation_error,
)
from deploy.collector.shadow_api import shadow_router
from deploy.fleet.view import fleet_summary
from deploy.messages.vocabulary import OutcomeName, Risk

CSV_COLUMNS = [c.name for c in LIST_COLUMNS] + ["device_clock_ahead"]
# OWASP's rule against CSV (formula) injection: a cell a spreadsheet would evaluate starts
# with one of these; such text cells get a leading apostrophe.  Numbers are left as they are.
FORMULA_PREFIXES = ("=", "+", "-", "@", "\t", "\r")


class CsvResponse(StreamingResponse):
    """A streamed CSV download."""

    media_type = "text/csv"  # Starlette adds "; charset=utf-8"


class FhirResponse(JSONResponse):
    """A FHIR R4 resource as JSON."""

    media_type = "application/fhir+json"


def result_filter(
    *,
    device: DeviceFilter = None,
    since: Since = None,
    until: Until = None,
    outcome: Annotated[OutcomeName | None, Query()] = None,
    risk: Annotated[Risk | None, Query(description="the decided call (abstained: none)")] = None,
    review: Annotated[bool | None, Query(description="needs a person's review")] = None,
    slide: SlideFilter = None,
) -> ResultFilter:
    """The shared filters of the result list and its CSV."""
    return ResultFilter(device, since, until, outcome, risk, review, slide)


def csv_cell(value: Any) -> Any:
    """``value`` as a spreadsheet must see it: text that starts a formula is quoted."""
    if isinstance(value, str) and value.startswith(FORMULA_PREFIXES):
        return "'" + value
    return value


def _csv_lines(rows: Iterator[dict[str, Any]]) -> Iterator[str]:
    buffer = io.StringIO()
    # CRLF rows (RFC 4180): the writer then quotes any cell holding a CR or LF
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, lineterminator="\r\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({name: csv_cell(row[name]) for name in CSV_COLUMNS})
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
    loop: LoopSettings | None = None,
    commands: CommandSender | None = None,
) -> FastAPI:
    """The ASGI application over ``queries``; writes (reviews, acks, sessions) go to ``engine``
    (default: ``queries.engine``); ``loop``: the data loop's settings; ``commands``: the MQTT
    session that sends scan/cancel (None: those routes answer 503)."""
    app = FastAPI(
        title="omis collect",
        version=__version__,
        description="The OMIS result archive (docs/collector.md).",
        openapi_url=None,  # served by add_docs, behind the login
        docs_url=None,
        redoc_url=None,
        responses=UNAUTHORIZED,
    )
    add_edge_defences(app, config)
    ctx = review_context(engine or queries.engine, config, review)
    login = principal_dependency(ctx)
    viewer = require(login, "viewer")
    add_docs(app, login)
    page_limit = config.max_page
    app.include_router(build_router(ctx, page_limit, commands))
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(StarletteHTTPException, body_error)

    @app.get(
        "/api/results",
        summary="results, newest first, filtered and paged",
        response_model=ResultPage,
    )
    def list_results(
        _who: Annotated[Principal, viewer],
        where: Annotated[ResultFilter, Depends(result_filter)],
        limit: Annotated[int, limit_query(page_limit)] = 100,
        offset: Offset = 0,
    ) -> dict[str, Any]:
        total, items = queries.list_results(where, limit, offset)
        return {"total": total, "limit": limit, "offset": offset, "items": items}

    @app.get(
        "/api/results.csv",
        summary="the same list as CSV (every matching row)",
        response_class=CsvResponse,
        responses={200: {"content": {"text/csv": {"schema": {"type": "string"}}}}},
    )
    def results_csv(
        _who: Annotated[Principal, viewer],
        where: Annotated[ResultFilter, Depends(result_filter)],
    ) -> CsvResponse:
        headers = {"Content-Disposition": 'attachment; filename="omis-results.csv"'}
        return CsvResponse(_csv_lines(queries.iter_results(where)), headers=headers)

    def stored(message_id: str) -> dict[str, Any]:
        found = queries.get_result(known_id(message_id))
        if found is None:
            raise HTTPException(404, f"no result {message_id!r}")
        return found

    @app.get(
        "/api/results/{message_id}",
        summary="one result: the full payload and its row, with its reviews",
        response_model=ResultDetail,
        responses=NOT_FOUND,
    )
    def get_result(_who: Annotated[Principal, viewer], message_id: MessageId) -> dict[str, Any]:
        found = stored(message_id)
        reviews = ctx.worklist.reviews_of(message_id)
        found["reviews"] = reviews
        found["verdict"] = reviews[-1] if reviews else None
        found["report_status"] = report_status(reviews)
        return found

    @app.get(
        "/api/results/{message_id}/fhir",
        summary="one result as a FHIR R4 Bundle",
        response_class=FhirResponse,
        responses={
            **NOT_FOUND,
            200: {
                "description": "a FHIR R4 Bundle (DiagnosticReport, Observations, Devices)",
                "content": {"application/fhir+json": {"schema": {"type": "object"}}},
            },
        },
    )
    def get_fhir(_who: Annotated[Principal, viewer], message_id: MessageId) -> FhirResponse:
        body = diagnostic_bundle(stored(message_id), ctx.worklist.reviews_of(message_id))
        return FhirResponse(body)

    @app.get(
        "/api/devices",
        summary="known devices with live state and their fleet view",
        response_model=list[Device],
    )
    def list_devices(_who: Annotated[Principal, viewer]) -> list[dict[str, Any]]:
        return fleet_summary(queries.engine, queries.devices())

    @app.get(
        "/api/rejected",
        summary="messages set aside: bytes as received, topic, reason",
        response_model=RejectedPage,
    )
    def list_rejected(
        _who: Annotated[Principal, viewer],
        device: DeviceFilter = None,
        limit: Annotated[int, limit_query(page_limit)] = 100,
        offset: Offset = 0,
    ) -> dict[str, Any]:
        return queries.rejected(device=device, limit=limit, offset=offset)

    app.include_router(loop_router(queries.engine, loop or LoopSettings(), viewer))

    app.include_router(fleet_router(queries.engine, viewer, page_limit))
    app.include_router(shadow_router(queries.engine, viewer))
    if dashboard is not None:
        add_dashboard_settings(app, config, prefix)
        app.mount("/", StaticFiles(directory=dashboard, html=True), name="dashboard")
    return app
