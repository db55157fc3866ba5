"""The performance page in real headless Chromium, served by the archive's own HTTP API.

The archive serves deploy/dashboard itself (real node_modules from scripts/dashboard-deps.sh)
with its own security headers, so the page runs under the strict Content-Security-Policy of
deploy/collector/http_security.py; conftest's ``page`` fixture fails the test on any JavaScript
error or CSP violation.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import uvicorn
from playwright.sync_api import Page, expect
from test_dataloop_performance import _bundle, _fill
from test_deploy_dashboard import DASHBOARD

from deploy.broker import free_port
from deploy.collector.api import create_app
from deploy.collector.config import HttpConfig
from deploy.collector.db import open_engine
from deploy.collector.loop_api import LoopSettings
from deploy.collector.performance import Limits, load_baselines
from deploy.collector.queries import ArchiveQueries


@pytest.fixture
def archive_site(tmp_path: Path) -> Iterator[str]:
    url = f"sqlite:///{tmp_path / 'archive.sqlite'}"
    _fill(url, 80, flip=0.5, seed=7)
    reader, writer = open_engine(url, writer=False), open_engine(url)
    loop = LoopSettings(writer, load_baselines([_bundle(tmp_path)]), Limits(min_n=10))
    # the archive's static file server (rightly) does not follow a symlinked node_modules
    uplot = DASHBOARD / "node_modules" / "uplot"
    assert uplot.is_dir() and not uplot.parent.is_symlink(), "run scripts/dashboard-deps.sh"
    app = create_app(ArchiveQueries(reader), HttpConfig(), DASHBOARD, loop=loop)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(10)
    reader.dispose()
    writer.dispose()


def test_performance_page_shows_each_model_with_chart_and_alerts(
    archive_site: str, page: Page
) -> None:
    response = page.goto(f"{archive_site}/performance.html")
    assert response is not None
    assert "script-src 'self'" in response.headers["content-security-policy"]
    rows = page.locator("#perf-models tbody tr")
    expect(rows).to_have_count(1)
    expect(rows.first).to_contain_text("omis-test v4")
    expect(rows.first).to_contain_text("performance: sensitivity")
    expect(rows.first).to_have_class("alerting")
    expect(page.locator("#perf-charts canvas")).to_have_count(1)
    expect(page.locator("#perf-note")).to_contain_text("reviewed")
    page.fill("input[name=device]", "nobody")
    page.click("#perf-filters button[type=submit]")
    expect(page.locator("#perf-note")).to_contain_text("0 results")
