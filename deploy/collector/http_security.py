"""Browser-facing defences of the archive's HTTP server (docs/security.md, "Lab side").

* Security headers on every response, errors included: a Content-Security-Policy without inline
  script (``default-src 'self'``; ``connect-src`` adds only the configured broker WebSocket
  URL), ``frame-ancestors 'none'`` with ``X-Frame-Options: DENY`` (no framing, no clickjacking),
  ``X-Content-Type-Options: nosniff`` and ``Referrer-Policy: no-referrer``.
* Allowed hosts: Starlette's ``TrustedHostMiddleware`` refuses a ``Host`` header outside
  ``http.allowed_hosts`` (DNS rebinding).
* The API description (``/api/openapi.json``, ``/api/docs``) is served behind the same login as
  the API.
"""

from __future__ import annotations

import re
import secrets
from typing import Any

from fastapi import Depends, FastAPI
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse
from starlette.datastructures import Headers, MutableHeaders
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from deploy.collector.config import HttpConfig

# a host name or address fit to be written into a header (the allowed-hosts check refuses
# anything else before a response is made; this keeps the header safe on its own)
_HOST = re.compile(r"[A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\]")
OPENAPI_URL = "/api/openapi.json"
DOCS_URL = "/api/docs"
# Swagger UI's own files come from its CDN (FastAPI's default); only the docs page may load them.
SWAGGER_CDN = "https://cdn.jsdelivr.net"


# Where the dashboard's broker is when http.dashboard_broker_url is unset: the page's own host
# on the shipped WebSockets listener (deploy/dashboard/app.js).
DEFAULT_BROKER_PORT = 8884


def content_security_policy(config: HttpConfig, host: str | None = None) -> str:
    """The policy for the dashboard and the API: same origin only, plus the broker socket.

    Without ``http.dashboard_broker_url`` the page connects to its own host on port 8884, so
    ``host`` (the request's ``Host``, already checked against the allowed hosts) names it."""
    if config.dashboard_broker_url:
        broker = config.dashboard_broker_url
    elif host:
        broker = f"ws://{host}:{DEFAULT_BROKER_PORT} wss://{host}:{DEFAULT_BROKER_PORT}"
    else:
        broker = ""
    return "; ".join(
        (
            "default-src 'self'",
            "script-src 'self'",
            "style-src 'self'",
            "img-src 'self' data:",
            f"connect-src 'self' {broker}".rstrip(),
            "object-src 'none'",
            "base-uri 'none'",
            "form-action 'self'",
            "frame-ancestors 'none'",
        )
    )


STATIC_HEADERS = {
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Opener-Policy": "same-origin",
}


def request_host(scope: Scope) -> str | None:
    """The request's host name without the port, if it is a plain name or address."""
    value = Headers(scope=scope).get("host", "")
    name = value[: value.index("]") + 1] if value.startswith("[") and "]" in value else value
    name = name if name.startswith("[") else name.rpartition(":")[0] or name
    return name if _HOST.fullmatch(name) else None


class SecurityHeaders:
    """ASGI middleware: the security headers on every HTTP response that does not set them
    itself (a route may set its own CSP, as the docs page does)."""

    def __init__(self, app: ASGIApp, config: HttpConfig) -> None:
        self.app = app
        self.config = config

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Pass the request on; decorate the response start."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        policy = content_security_policy(self.config, request_host(scope))

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                headers.setdefault("Content-Security-Policy", policy)
                for name, value in STATIC_HEADERS.items():
                    headers.setdefault(name, value)
            await send(message)

        await self.app(scope, receive, send_with_headers)


def add_edge_defences(app: FastAPI, config: HttpConfig) -> None:
    """Allowed hosts inside, security headers outside (so a refused host gets them too)."""
    app.add_middleware(TrustedHostMiddleware, allowed_hosts=config.allowed_hosts)
    app.add_middleware(SecurityHeaders, config=config)


def add_docs(app: FastAPI, login: Any) -> None:
    """``/api/openapi.json`` and ``/api/docs`` behind ``login`` (create the app without them)."""

    @app.get(OPENAPI_URL, include_in_schema=False, dependencies=[Depends(login)])
    def openapi() -> JSONResponse:
        return JSONResponse(app.openapi())

    @app.get(DOCS_URL, include_in_schema=False, dependencies=[Depends(login)])
    def docs() -> HTMLResponse:
        nonce = secrets.token_urlsafe(16)
        page = get_swagger_ui_html(openapi_url=OPENAPI_URL, title=f"{app.title} - API")
        body = bytes(page.body).decode().replace("<script>", f'<script nonce="{nonce}">')
        policy = "; ".join(
            (
                "default-src 'self'",
                f"script-src 'self' {SWAGGER_CDN} 'nonce-{nonce}'",
                f"style-src 'self' {SWAGGER_CDN}",
                "img-src 'self' data: https://fastapi.tiangolo.com",
                "connect-src 'self'",
                "object-src 'none'",
                "base-uri 'none'",
                "frame-ancestors 'none'",
            )
        )
        return HTMLResponse(body, headers={"Content-Security-Policy": policy})
