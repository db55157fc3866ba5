"""The collector's HTTP API (FastAPI): results with filters and paging, CSV, FHIR, devices, alerts.

OpenAPI is served at ``/api/openapi.json`` (browsable at ``/api/docs``), behind the same login as
the API.  Every endpoint needs at least the ``viewer`` role; unauthenticated requests are
accepted from localhost only (see :mod:`deploy.collector.auth`).  Every parameter is bounded
before it reaches SQL (:mod:`deploy.collector.http_params`); every response carries the security
headers of :mod:`deploy.collector.http_security`.  The dashboard's static files are served at
``/`` when present.
"""

import csv
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.security import HTTPBasic, HTTPBasicCredentials
from fastapi.staticfiles import StaticFiles

from deploy import __version__
from deploy.collector.api_models import (
    NOT_FOUND,
    UNAUTHORIZED,
    Alert,
    Device,
    Me,
    ResultDetail,
    ResultPage,
)
from deploy.collector.auth import LOCAL_HOSTS, Accounts, Principal
from deploy.collector.config import HttpConfig
from deploy.collector.fhir import diagnostic_bundle
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
from deploy.collector.queries import LIST_COLUMNS, ArchiveQueries, ResultFilter
from deploy.messages.vocabulary import OutcomeName, Risk

CSV_COLUMNS = [c.name for c in LIST_COLUMNS] + ["device_clock_ahead"]
# OWASP's rule against CSV (formula) injection: a cell a spreadsheet would evaluate starts
# with one of these; such text cells get a leading apostrophe.  Numbers are left as they are.
FORMULA_PREFIXES = ("=", "+", "-", "@", "\t", "\r")
_basic = HTTPBasic(auto_error=False)


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


def _is_local(request: Request) -> bool:
    return request.client is not None and request.client.host in LOCAL_HOSTS


def _principal_dependency(config: HttpConfig) -> Any:
    accounts = Accounts(config.accounts)

    def principal(
        request: Request, credentials: Annotated[HTTPBasicCredentials | None, Depends(_basic)]
    ) -> Principal:
        if credentials is not None:
            found = accounts.check(credentials.username, credentials.password)
            if found is not None:
                return found
        elif config.require_auth_on_localhost is False and _is_local(request):
            return Principal("local", "viewer")
        raise HTTPException(401, "authentication required", {"WWW-Authenticate": "Basic"})

    return principal


def create_app(queries: ArchiveQueries, config: HttpConfig, dashboard: Path | None) -> FastAPI:
    """The ASGI application over ``queries``."""
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
    login = _principal_dependency(config)
    viewer = Depends(login)
    add_docs(app, login)
    page_limit = config.max_page

    @app.get("/api/me", summary="who is asking, with the role")
    def me(who: Annotated[Principal, viewer]) -> Me:
        return Me(name=who.name, role=who.role)

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
        found = queries.get_result(message_id)
        if found is None:
            raise HTTPException(404, f"no result {message_id!r}")
        return found

    @app.get(
        "/api/results/{message_id}",
        summary="one result: the full payload and its row",
        response_model=ResultDetail,
        responses=NOT_FOUND,
    )
    def get_result(_who: Annotated[Principal, viewer], message_id: MessageId) -> dict[str, Any]:
        return stored(message_id)

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
        return FhirResponse(diagnostic_bundle(stored(message_id)))

    @app.get("/api/devices", summary="known devices with live state", response_model=list[Device])
    def list_devices(_who: Annotated[Principal, viewer]) -> list[dict[str, Any]]:
        return queries.devices()

    @app.get("/api/alerts", summary="alerts, newest first", response_model=list[Alert])
    def list_alerts(
        _who: Annotated[Principal, viewer],
        open_only: Annotated[bool, Query(alias="open", description="open alerts only")] = False,
        device: DeviceFilter = None,
        limit: Annotated[int, limit_query(page_limit)] = 200,
    ) -> list[dict[str, Any]]:
        return queries.alerts(open_only=open_only, device=device, limit=limit)

    if dashboard is not None:
        app.mount("/", StaticFiles(directory=dashboard, html=True), name="dashboard")
    return app
