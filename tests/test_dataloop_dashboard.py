"""The performance page in real headless Chromium, served by the archive's own HTTP API."""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import uvicorn
from playwright.sync_api import expect, sync_playwright
from test_dataloop_performance import _bundle, _fill
from test_deploy_dashboard import CHROMIUM, CHROMIUM_FLAGS, DASHBOARD

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
    # a copy with the real uPlot files: a worktree's node_modules may be a symlink, which the
    # archive's static file server (rightly) does not follow
    site = tmp_path / "site"
    shutil.copytree(DASHBOARD, site, ignore=shutil.ignore_patterns("node_modules"))
    uplot = (DASHBOARD / "node_modules" / "uplot" / "dist").resolve()
    shutil.copytree(uplot, site / "node_modules" / "uplot" / "dist")
    app = create_app(ArchiveQueries(reader), HttpConfig(), site, loop)
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
    archive_site: str, tmp_path: Path
) -> None:
    assert (DASHBOARD / "node_modules" / "uplot").is_dir(), "run scripts/dashboard-deps.sh first"
    with sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            str(tmp_path / "profile"), executable_path=CHROMIUM, args=CHROMIUM_FLAGS
        )
        page = context.pages[0] if context.pages else context.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.goto(f"{archive_site}/performance.html")
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
        context.close()
    assert errors == []
