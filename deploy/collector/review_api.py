"""The API of people working the archive: login/logout, the worklist, reviews, alert acks,
the audit trail (docs/collector.md "People, review and sign-out").

:func:`principal_dependency` decides who is asking for every route of the collector (session
cookie + CSRF, bearer token, HTTP Basic, or unauthenticated localhost); :func:`require` adds a
role check.  The routes live on one ``APIRouter`` so the read API in :mod:`api` stays apart.
"""

import hmac
import json
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, HTTPException, Path, Query, Request, Response
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from pydantic import AliasChoices, BaseModel, ConfigDict, Field, field_validator, model_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from deploy.collector.api_models import Alert
from deploy.collector.audit import Actor, AuditFilter, read_audit, record_now
from deploy.collector.auth import (
    LOCAL_HOSTS,
    Authenticator,
    AuthError,
    Principal,
    UserStore,
    basic_credentials,
    rank,
)
from deploy.collector.bethesda import Bethesda
from deploy.collector.commands_api import Commands, CommandSender, add_command_routes
from deploy.collector.config import HttpConfig
from deploy.collector.http_params import (
    ID_CHARS,
    MAX_OFFSET,
    DeviceFilter,
    MessageId,
    QueryTime,
    text_query,
    time_query,
)
from deploy.collector.queries import rfc3339
from deploy.collector.review import (
    REASONS,
    AlertFilter,
    ConflictError,
    ForbiddenError,
    NotFoundError,
    Worklist,
    WorklistFilter,
    list_alerts,
)

log = logging.getLogger(__name__)

COOKIE = "omis_session"
_DETAIL = {"application/json": {"schema": {"type": "object", "properties": {"detail": {}}}}}
RESPONSES: dict[int | str, dict[str, Any]] = {
    401: {"description": "not authenticated", "content": _DETAIL},
    403: {
        "description": "role too low, CSRF token missing, or a cross-site write",
        "content": _DETAIL,
    },
    404: {"description": "no such result, alert or user", "content": _DETAIL},
    409: {"description": "conflicts with the stored state", "content": _DETAIL},
    429: {"description": "too many failed authentications from this client", "content": _DETAIL},
    503: {"description": "password checks busy", "content": _DETAIL},
}
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
UUID_PATTERN = r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$"
_UUID = re.compile(UUID_PATTERN)
# every kind an alert is raised with: review's and ingest's, fleet's (OTA rollback), the data
# loop's (performance, drift)
AlertKind = Literal[
    "high_risk",
    "seq_gap",
    "seq_reused",
    "offline",
    "rejected",
    "conflict",
    "rollback",
    "performance",
    "drift",
]
AUDIT_TARGET_CHARS = 300  # audit.target column
AUDIT_ACTION_CHARS = 32  # audit.action column


def _no_nul(value: str | None) -> str | None:
    if value is not None and not _storable(value):
        raise ValueError("must not contain NUL characters or lone surrogates")
    return value


def _storable(value: str) -> bool:
    """True if both databases can store ``value`` (no NUL, valid UTF-8)."""
    if "\x00" in value:
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class LoginBody(_Body):
    """``POST /api/login``."""

    name: str = Field(min_length=1, max_length=64)
    password: str = Field(min_length=1, max_length=1024)


class ReviewBody(_Body):
    """``POST /api/results/{message_id}/review``: a verdict (sign-out or amendment)."""

    bethesda: Bethesda | None = Field(
        default=None, description="Bethesda 2014 category; null only when unsatisfactory"
    )
    adequacy: Literal["satisfactory", "unsatisfactory"]
    comment: str | None = Field(default=None, max_length=4000)

    _nul = field_validator("comment")(_no_nul)

    @model_validator(mode="after")
    def _category_needed(self) -> "ReviewBody":
        if self.bethesda is None and self.adequacy == "satisfactory":
            raise ValueError("bethesda: required when adequacy is satisfactory")
        return self


class ClaimBody(_Body):
    """``POST /api/worklist/{message_id}/claim``: ``user`` assigns to someone else."""

    user: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z0-9_.@-]{1,64}$",
        validation_alias=AliasChoices("user", "assignee", "user_name"),
        description="assign to this user (pathologist+); absent: claim for yourself",
    )


class ReleaseBody(_Body):
    """``POST /api/worklist/{message_id}/release`` (no fields)."""


class AckBody(_Body):
    """``POST /api/alerts/{id}/ack``."""

    note: str | None = Field(default=None, max_length=1000)

    _nul = field_validator("note")(_no_nul)


@dataclass
class ReviewContext:
    """What the routes share: users, the authenticator, the worklist, the HTTP settings."""

    users: UserStore
    auth: Authenticator
    worklist: Worklist
    config: HttpConfig


def _client(request: Request) -> str:
    return request.client.host if request.client is not None else "?"


def _challenge(request: Request) -> dict[str, str]:
    """The Basic challenge, except for page scripts (``X-Requested-With``): a browser would
    answer it with its own password dialog over the dashboard's login page."""
    return {} if request.headers.get("x-requested-with") else {"WWW-Authenticate": "Basic"}


def _refused(exc: AuthError, request: Request) -> HTTPException:
    headers = _challenge(request) if exc.status == 401 else {}
    if exc.retry_after is not None:
        headers["Retry-After"] = str(exc.retry_after)
    return HTTPException(exc.status, exc.detail, headers or None)


def _from_header(ctx: ReviewContext, header: str, client: str) -> Principal:
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "bearer":
        return ctx.auth.check_token(value.strip(), client)
    credentials = basic_credentials(header)
    if credentials is None:
        raise AuthError(401, "Authorization: Basic (UTF-8 name:password) or Bearer token")
    return ctx.auth.check_password(*credentials, client)


def _from_cookie(ctx: ReviewContext, request: Request, cookie: str) -> Principal:
    found = ctx.users.session(cookie)
    account = None if found is None else ctx.auth.account(found[0])
    if found is None or account is None:  # expired, ended, or its user disabled
        raise AuthError(401, "session expired or ended; log in again")
    csrf = found[1]
    if request.method not in SAFE_METHODS:
        sent = request.headers.get("x-csrf-token", "")
        if not hmac.compare_digest(sent.encode(), csrf.encode()):
            raise HTTPException(403, "CSRF token missing or wrong (send X-CSRF-Token)")
    return Principal(account[0], account[1], "session", csrf)


def _cross_site(request: Request) -> str | None:
    """Why a write comes from another site (Fetch Metadata, then Origin vs Host), or None.

    A browser attaches remembered HTTP Basic credentials to a form another site posts; it also
    says where the request came from, which programs never do.
    """
    fetch_site = request.headers.get("sec-fetch-site")
    if fetch_site is not None:  # every current browser sends it; a proxy keeps it
        return None if fetch_site in ("same-origin", "none") else f"Sec-Fetch-Site: {fetch_site}"
    origin = request.headers.get("origin")
    if origin is not None:  # older browsers: the Origin must be the host asked (or forwarded)
        host = origin.split("://", 1)[-1].rstrip("/")
        hosts = {request.headers.get("host"), request.headers.get("x-forwarded-host")}
        if host not in hosts:
            return f"Origin {origin}"
    return None


def principal_dependency(ctx: ReviewContext) -> Callable[[Request], Principal]:
    """The dependency that says who is asking (401/403/429/503 when nobody acceptable)."""

    def principal(request: Request) -> Principal:
        client = _client(request)
        if request.method not in SAFE_METHODS:
            foreign = _cross_site(request)
            if foreign is not None:
                raise HTTPException(403, f"cross-site write refused ({foreign})")
        try:
            header = request.headers.get("authorization")
            if header:
                return _from_header(ctx, header, client)
            cookie = request.cookies.get(COOKIE)
            if cookie:
                return _from_cookie(ctx, request, cookie)
        except AuthError as exc:
            raise _refused(exc, request) from None
        if not ctx.config.require_auth_on_localhost and client in LOCAL_HOSTS:
            return Principal("local", "viewer", "local")
        raise HTTPException(401, "authentication required", _challenge(request) or None)

    return principal


def require(principal: Callable[[Request], Principal], role: str) -> Any:
    """A dependency: the principal, if its role is ``role`` or above (403 otherwise)."""

    def check(who: Annotated[Principal, Depends(principal)]) -> Principal:
        if rank(who.role) < rank(role):
            raise HTTPException(403, f"needs the {role} role or above (you are {who.role})")
        return who

    return Depends(check)


def _actor(who: Principal, request: Request) -> Actor:
    return Actor(who.name, who.role, _client(request))


def known_id(message_id: str) -> str:
    """``message_id`` if it can name a stored result (a UUID); 404 otherwise, before any SQL."""
    if not _UUID.fullmatch(message_id):
        raise HTTPException(404, f"no result {message_id!r}")
    return message_id


def _mapped(call: Callable[[], Any]) -> Any:
    """Run ``call``; the review module's errors become 404/409/403."""
    try:
        return call()
    except NotFoundError as exc:
        raise HTTPException(404, str(exc)) from exc
    except ConflictError as exc:
        raise HTTPException(409, str(exc)) from exc
    except ForbiddenError as exc:
        raise HTTPException(403, str(exc)) from exc


def _secure(ctx: ReviewContext, request: Request) -> bool:
    configured = ctx.config.secure_cookies
    return request.url.scheme == "https" if configured is None else configured


def validation_error(_request: Request, exc: Exception) -> Response:
    """422 naming the fields, never echoing the input (a password, a crafted string that
    cannot be encoded) back."""
    errors = exc.errors() if isinstance(exc, RequestValidationError) else []
    detail = [
        {"loc": list(e.get("loc", ())), "msg": str(e.get("msg", "")), "type": e.get("type")}
        for e in errors
    ]
    body = json.dumps({"detail": detail}, ensure_ascii=True, default=str, allow_nan=False)
    return Response(body, status_code=422, media_type="application/json")


async def body_error(request: Request, exc: Exception) -> Response:
    """FastAPI answers a JSON body that is not UTF-8 with an undocumented 400 ("error parsing
    the body"); it is a malformed body like any other: the 422 of :func:`validation_error`.
    Every other HTTP error keeps FastAPI's own answer."""
    if (
        isinstance(exc, StarletteHTTPException)
        and exc.status_code == 400
        and isinstance(exc.__cause__, UnicodeDecodeError)
    ):
        detail = [{"loc": ["body"], "msg": "the body is not UTF-8 JSON", "type": "json_invalid"}]
        body = json.dumps({"detail": detail}, allow_nan=False)
        return Response(body, 422, media_type="application/json")
    assert isinstance(exc, StarletteHTTPException)
    return await http_exception_handler(request, exc)


def build_router(
    ctx: ReviewContext, page_limit: int, commands: CommandSender | None = None
) -> APIRouter:
    """Every route of this module on one router, with scan/cancel (:mod:`commands_api`)
    sent through ``commands`` (None: those routes answer 503)."""
    router = APIRouter(responses=RESPONSES)
    principal = principal_dependency(ctx)
    viewer = require(principal, "viewer")
    operator = require(principal, "operator")
    sending = Commands(commands, ctx.users.engine, ctx.config.command_timeout_s)
    add_command_routes(router, operator, sending)
    _session_routes(router, ctx, principal, viewer)
    _worklist_routes(router, ctx, principal, viewer, page_limit)
    _alert_routes(router, ctx, principal, viewer, page_limit)
    _admin_routes(router, ctx, principal, page_limit)
    return router


def _session_routes(router: APIRouter, ctx: ReviewContext, principal: Any, viewer: Any) -> None:
    @router.post("/api/login", summary="log in: a session cookie and its CSRF token")
    def login(body: LoginBody, request: Request, response: Response) -> dict[str, Any]:
        client = _client(request)
        foreign = _cross_site(request)
        if foreign is not None:  # login CSRF: another site logging the browser in
            raise HTTPException(403, f"cross-site login refused ({foreign})")
        try:
            who = ctx.auth.check_password(body.name, body.password, client)
        except AuthError as exc:
            if exc.status == 401:
                shown = body.name.encode("utf-8", "replace").decode().replace("\x00", "?")
                actor = Actor(shown, None, client)
                record_now(ctx.users.engine, actor, "login.failed", None, {})
            raise _refused(exc, request) from None
        cookie, csrf, expires = ctx.users.new_session(who.name, ctx.config.session_ttl_s)
        response.set_cookie(
            COOKIE, cookie, max_age=ctx.config.session_ttl_s, path="/", httponly=True,
            samesite="strict", secure=_secure(ctx, request),
        )  # fmt: skip
        record_now(ctx.users.engine, Actor(who.name, who.role, client), "login", None, {})
        return {"name": who.name, "role": who.role, "csrf_token": csrf,
                "expires_at": rfc3339(expires)}  # fmt: skip

    @router.post("/api/logout", status_code=204, summary="end the session")
    def logout(who: Annotated[Principal, viewer], request: Request) -> Response:
        cookie = request.cookies.get(COOKIE)
        if who.via == "session" and cookie:
            ctx.users.end_session(cookie)
            record_now(ctx.users.engine, _actor(who, request), "logout", None, {})
        response = Response(status_code=204)
        response.delete_cookie(COOKIE, path="/", httponly=True, samesite="strict")
        return response

    @router.get("/api/me", summary="who is asking, with the role")
    def me(who: Annotated[Principal, viewer]) -> dict[str, str]:
        out = {"name": who.name, "role": who.role, "via": who.via}
        if who.csrf is not None:
            out["csrf_token"] = who.csrf
        return out


def _worklist_routes(
    router: APIRouter, ctx: ReviewContext, principal: Any, viewer: Any, page_limit: int
) -> None:
    cytotech = require(principal, "cytotech")

    @router.get("/api/worklist", summary="results that need a person, oldest first")
    def worklist(
        *,
        _who: Annotated[Principal, viewer],
        device: DeviceFilter = None,
        reason: Annotated[Literal[REASONS] | None, Query()] = None,  # type: ignore[valid-type]
        since: Annotated[QueryTime, time_query("finished at or after")] = None,
        until: Annotated[QueryTime, time_query("finished before")] = None,
        claimed_by: Annotated[
            str | None,
            Query(
                description='user name, or "none" for unclaimed',
                max_length=ID_CHARS,
                pattern=r"^[A-Za-z0-9_.@-]{1,64}$",
            ),
        ] = None,
        signed: Literal["false", "true", "any"] = "false",
        limit: Annotated[int, Query(ge=1, le=page_limit)] = 100,
        offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0,
    ) -> dict[str, Any]:
        _check_text("device", device)
        where = WorklistFilter(device, reason, since, until, claimed_by, signed)
        total, items = ctx.worklist.items(where, limit, offset)
        return {"total": total, "limit": limit, "offset": offset, "items": items}

    @router.post("/api/worklist/{message_id}/claim", summary="claim, or assign (pathologist+)")
    def claim(
        *,
        message_id: MessageId,
        who: Annotated[Principal, cytotech],
        request: Request,
        body: ClaimBody | None = None,
    ) -> dict[str, Any]:
        known_id(message_id)
        user = None if body is None else body.user
        if user is not None and user != who.name and not who.at_least("pathologist"):
            raise HTTPException(403, "assigning to another user needs the pathologist role")
        return _mapped(lambda: ctx.worklist.claim(message_id, _actor(who, request), user))  # type: ignore[no-any-return]

    @router.post("/api/worklist/{message_id}/release", summary="drop the claim")
    def release(
        *,
        message_id: MessageId,
        who: Annotated[Principal, cytotech],
        request: Request,
        _body: ReleaseBody | None = None,
    ) -> dict[str, Any]:
        known_id(message_id)
        _mapped(lambda: ctx.worklist.release(message_id, _actor(who, request)))
        return {"message_id": message_id, "claimed_by": None}

    @router.post(
        "/api/results/{message_id}/review",
        status_code=201,
        summary="record a verdict: sign-out, or an amendment of the current one",
    )
    def review(
        *,
        message_id: MessageId,
        body: ReviewBody,
        who: Annotated[Principal, cytotech],
        request: Request,
    ) -> dict[str, Any]:
        known_id(message_id)
        verdict = body.model_dump()
        added, status = _mapped(
            lambda: ctx.worklist.add_review(message_id, verdict, _actor(who, request))
        )
        return {"review": added, "report_status": status}


def _alert_routes(
    router: APIRouter, ctx: ReviewContext, principal: Any, viewer: Any, page_limit: int
) -> None:
    operator = require(principal, "operator")

    @router.get(
        "/api/alerts",
        summary="alerts: open high-risk first, then newest first",
        response_model=list[Alert],
    )
    def alerts(
        *,
        _who: Annotated[Principal, viewer],
        response: Response,
        open_only: Annotated[bool, Query(alias="open")] = False,
        kind: AlertKind | None = None,
        device: DeviceFilter = None,
        acked: bool | None = None,
        limit: Annotated[int, Query(ge=1, le=page_limit)] = 200,
        offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0,
    ) -> list[dict[str, Any]]:
        _check_text("device", device)
        where = AlertFilter(open_only, kind, device, acked)
        total, items = list_alerts(ctx.worklist.engine, where, limit, offset)
        response.headers["X-Total-Count"] = str(total)
        return items

    @router.post(
        "/api/alerts/{alert_id}/ack",
        summary="acknowledge an alert (who, when)",
        response_model=Alert,
    )
    def ack(
        *,
        alert_id: Annotated[int, Path(ge=1, le=2**62)],
        who: Annotated[Principal, operator],
        request: Request,
        body: AckBody | None = None,
    ) -> dict[str, Any]:
        note = None if body is None else body.note
        return _mapped(lambda: ctx.worklist.ack_alert(alert_id, _actor(who, request), note))  # type: ignore[no-any-return]


def _admin_routes(router: APIRouter, ctx: ReviewContext, principal: Any, page_limit: int) -> None:
    admin = require(principal, "admin")

    @router.get("/api/audit", summary="the audit trail, newest first (admins)")
    def audit(
        *,
        _who: Annotated[Principal, admin],
        action: Annotated[str | None, text_query(AUDIT_ACTION_CHARS, "action")] = None,
        user: Annotated[str | None, text_query(ID_CHARS, "user name")] = None,
        target: Annotated[str | None, text_query(AUDIT_TARGET_CHARS, "what was acted on")] = None,
        since: Annotated[QueryTime, time_query("at or after")] = None,
        until: Annotated[QueryTime, time_query("before")] = None,
        limit: Annotated[int, Query(ge=1, le=page_limit)] = 100,
        offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0,
    ) -> dict[str, Any]:
        for name, value in (("action", action), ("user", user), ("target", target)):
            _check_text(name, value)
        where = AuditFilter(action, user, target, since, until)
        total, items = read_audit(ctx.users.engine, where, limit, offset)
        return {"total": total, "limit": limit, "offset": offset, "items": items}

    @router.get("/api/users", summary="archive users and roles (admins)")
    def list_users(_who: Annotated[Principal, admin]) -> list[dict[str, Any]]:
        return ctx.users.list()


def _check_text(name: str, value: str | None) -> None:
    if value is not None and not _storable(value):
        raise HTTPException(422, f"{name}: must not contain NUL characters or lone surrogates")
