"""``GET /config.json``: what the dashboard page needs from the server's configuration.

The page takes its endpoints from here (same origin as the page) and never from its own URL: a
crafted link (``?api=…`` or ``?broker=…``) used to make it send the remembered password to
another host (issue 20).  The archive API is always the page's own origin (``api/``); the broker
is ``http.dashboard_broker_url`` (``null``: the page's host on 8884, the shipped listener).
Nothing secret is in it, so it answers without a login: the page needs it to draw the login.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

from deploy.collector.config import HttpConfig


def add_dashboard_settings(app: FastAPI, config: HttpConfig, prefix: str) -> None:
    """Register ``GET /config.json`` (before the static files, which it would otherwise hit)."""
    body: dict[str, Any] = {
        "schema": "omis.dashboard_config/1",
        "broker_url": config.dashboard_broker_url,
        "prefix": prefix,
        "archive": True,
    }

    @app.get("/config.json", include_in_schema=False)
    def dashboard_config() -> dict[str, Any]:
        return body
