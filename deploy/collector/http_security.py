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

import secrets
from typing import Any

from fastapi import Depends, FastAPI
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse
from starlette.datastructures import MutableHeaders
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from deploy.collector.config import HttpConfig

OPENAPI_URL = "/api/openapi.json"
DOCS_URL = "/api/docs"
# Swagger UI's own files come from its CDN (FastAPI's default); only the docs page may load them.
SWAGGER_CDN = "https://cdn.jsdelivr.net"


def content_security_policy(config: HttpConfig) -> str:
    """The policy for the dashboard and the API: same origin only, plus the broker socket."""
    connect = "'self'" + (f" {config.broker_ws_url}" if config.broker_ws_url else "")
    return "; ".join(
        (
            "default-src 'self'",
            "script-src 'self'",
            "style-src 'self'",
            "img-src 'self' data:",
            f"connect-src {connect}",
            "object-src 'none'",
            "base-uri 'none'",
            "form-action 'self'",
            "frame-ancestors 'none'",
        )
    )


def security_headers(config: HttpConfig) -> dict[str, str]:
    """Every header the server adds to every response (a route may set its own CSP)."""
    return {
        "Content-Security-Policy": content_security_policy(config),
        "X-Frame-Options": "DENY",
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",
        "Cross-Origin-Opener-Policy": "same-origin",
    }


class SecurityHeaders:
    """ASGI middleware: add ``headers`` to every HTTP response that does not set them itself."""

    def __init__(self, app: ASGIApp, headers: dict[str, str]) -> None:
        self.app = app
        self.headers = headers

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Pass the request on; decorate the response start."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in self.headers.items():
                    headers.setdefault(name, value)
            await send(message)

        await self.app(scope, receive, send_with_headers)


def add_edge_defences(app: FastAPI, config: HttpConfig) -> None:
    """Allowed hosts inside, security headers outside (so a refused host gets them too)."""
    app.add_middleware(TrustedHostMiddleware, allowed_hosts=config.allowed_hosts)
    app.add_middleware(SecurityHeaders, headers=security_headers(config))


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
