"""The collector's HTTP API (FastAPI): results with filters and paging, CSV, FHIR, devices, alerts.

OpenAPI is served at ``/api/openapi.json`` (browsable at ``/api/docs``).  Every endpoint needs
at least the ``viewer`` role; unauthenticated requests are accepted from localhost only (see
:mod:`deploy.collector.auth`).  The dashboard's static files are served at ``/`` when present.
"""

import csv
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.security import HTTPBasic, HTTPBasicCredentials
from fastapi.staticfiles import StaticFiles

from deploy import __version__
from deploy.collector.auth import LOCAL_HOSTS, Accounts, Principal
from deploy.collector.config import HttpConfig
from deploy.collector.fhir import diagnostic_bundle
from deploy.collector.loop_api import LoopSettings, loop_router
from deploy.collector.queries import LIST_COLUMNS, ArchiveQueries, ResultFilter
from deploy.collector.store import parse_time

CSV_COLUMNS = [c.name for c in LIST_COLUMNS]
_basic = HTTPBasic(auto_error=False)


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


def create_app(
    queries: ArchiveQueries,
    config: HttpConfig,
    dashboard: Path | None,
    loop: LoopSettings | None = None,
) -> FastAPI:
    """The ASGI application over ``queries`` (``loop``: the data loop's settings)."""
    app = FastAPI(
        title="omis collect",
        version=__version__,
        description="The OMIS result archive (docs/collector.md).",
        openapi_url="/api/openapi.json",
        docs_url="/api/docs",
        redoc_url=None,
    )
    viewer = Depends(_principal_dependency(config))
    page_limit = config.max_page

    @app.get("/api/me", summary="who is asking, with the role")
    def me(who: Annotated[Principal, viewer]) -> dict[str, str]:
        return {"name": who.name, "role": who.role}

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
        found = queries.get_result(message_id)
        if found is None:
            raise HTTPException(404, f"no result {message_id!r}")
        return found

    @app.get("/api/results/{message_id}", summary="one result: the full payload and its row")
    def get_result(_who: Annotated[Principal, viewer], message_id: str) -> dict[str, Any]:
        return stored(message_id)

    @app.get("/api/results/{message_id}/fhir", summary="one result as a FHIR R4 Bundle")
    def get_fhir(_who: Annotated[Principal, viewer], message_id: str) -> JSONResponse:
        body = diagnostic_bundle(stored(message_id))
        return JSONResponse(body, media_type="application/fhir+json")

    @app.get("/api/devices", summary="known devices with live state")
    def list_devices(_who: Annotated[Principal, viewer]) -> list[dict[str, Any]]:
        return queries.devices()

    @app.get("/api/alerts", summary="alerts, newest first")
    def list_alerts(
        _who: Annotated[Principal, viewer],
        open_only: Annotated[bool, Query(alias="open")] = False,
        device: str | None = None,
        limit: Annotated[int, Query(ge=1, le=page_limit)] = 200,
    ) -> list[dict[str, Any]]:
        return queries.alerts(open_only=open_only, device=device, limit=limit)

    loop = loop or LoopSettings()
    app.include_router(loop_router(queries.engine, loop, viewer))
    if loop.writer is not None:
        from deploy.collector.signout_api import signout_router

        app.include_router(signout_router(loop.writer, viewer))

    if dashboard is not None:
        app.mount("/", StaticFiles(directory=dashboard, html=True), name="dashboard")
    return app
