"""The dashboard (deploy/dashboard/) in headless Chromium against the production broker config.

mosquitto runs the rendered production configuration (MQTT over WebSockets over TLS for the
dashboard, certificate + password for devices); the page is served as static files; a
simulated appliance (paho, client certificate) publishes availability, a retained status and
``omis.result/1`` payloads that pass the shipped JSON Schemas.  The page must show the device,
its state, model and model-store versions, the result rows (label, probability, abstained,
model version), per-device counts, and draw the spectrum with uPlot.  Screenshots go to
test-artifacts/ for a person to look at.

Debian's chromium is driven by Playwright for Python with ``executable_path`` (no browser
download).  deploy/dashboard/node_modules comes from ``scripts/dashboard-deps.sh``.
"""

from __future__ import annotations

import functools
import json
import math
import threading
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest
from deploy_support import (
    DASHBOARD_PORT,
    DEVICE_PORT,
    ROOT,
    Peer,
    RunningBroker,
    dev_broker_module,
)
from playwright.sync_api import Page, expect, sync_playwright

from deploy.broker import free_port
from deploy.messages.testing import result_json
from deploy.schemas import validate

CHROMIUM = "/usr/bin/chromium"
DASHBOARD = ROOT / "deploy" / "dashboard"
ARTIFACTS = ROOT / "test-artifacts"
PREFIX = "omis/v1"
SHA = "5e" * 32
DEVICE_PW = "pw-scope-07"
DASH_PW = "pw-dashboard"
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[RunningBroker]:
    tree = dev_broker_module().build_dev_broker(
        tmp_path / "broker",
        devices={"scope-07": DEVICE_PW},
        users={"dashboard": DASH_PW},
        ports={DEVICE_PORT: free_port(), DASHBOARD_PORT: free_port()},
    )
    running = RunningBroker(tree).start()
    yield running
    running.stop()


@pytest.fixture
def site() -> Iterator[str]:
    """deploy/dashboard served as static files (the dev option of docs/dashboard.md)."""
    vendored = DASHBOARD / "node_modules" / "mqtt" / "dist" / "mqtt.min.js"
    assert vendored.is_file(), "run scripts/dashboard-deps.sh (npm ci) first"
    handler = functools.partial(_QuietHandler, directory=str(DASHBOARD))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    thread.join(5)


@pytest.fixture
def page(tmp_path: Path) -> Iterator[Page]:
    with sync_playwright() as pw:
        # A fresh profile per test; the broker's certificate comes from the test CA, which
        # the browser does not know.
        context = pw.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"),
            executable_path=CHROMIUM,
            args=CHROMIUM_FLAGS,
            ignore_https_errors=True,
            viewport={"width": 1180, "height": 1000},
        )
        page = context.pages[0] if context.pages else context.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        yield page
        context.close()
        assert errors == [], f"JavaScript errors on the page: {errors}"


def status_payload(state: str) -> dict[str, Any]:
    return {
        "schema": "omis.status/1",
        "device_id": "scope-07",
        "state": state,
        "reasons": [],
        "boot_id": "boot-1",
        "app_version": "0.1.0",
        "model": {"name": "omis-vgg16", "version": 3, "sha256": SHA},
        "engine": {"name": "tensorrt", "precision": "fp16"},
        "firmware": {"name": "omis-fw", "version": "1.2.0"},
        "current_scan": None,
        "queue": {"depth": 0, "capacity": 8},
        "outbox": {"rows": 0, "bytes": 0, "full": False},
        "last_error": None,
        "at": "2026-01-01T12:00:00.000Z",
    }


def result_payload(seq: int, slide: str, high: float, abstained: bool = False) -> dict[str, Any]:
    """A result built by the device's own builders."""
    axis = [float(x) for x in range(-40, 41, 2)]
    values = [round(math.exp(-(((x - 8 * seq) / 12) ** 2)) * (1 + 0.1 * seq), 5) for x in axis]
    return result_json(
        seq,
        slide=slide,
        p_high=high,
        abstained=abstained,
        started_at="2026-01-01T12:00:00.000Z",
        finished_at=f"2026-01-01T12:00:0{seq}.500Z",
        model={"name": "omis-vgg16", "version": 3, "sha256": SHA},
        backend={"name": "tensorrt", "precision": "fp16"},
        axis=axis,
        values=values,
        fields=[{"index": 0, "valid_fraction": 0.93, "quality": "ok"}],
        timings_ms={"acquire": 310.2, "spectrum": 41.0, "infer": 6.3, "total": 420.5},
        simulation={"pap_group": "III"},
    )


def publish_json(
    peer: Peer, leaf: str, body: dict[str, Any], schema: str, retain: bool = False
) -> None:
    validate(schema, body)
    assert peer.publish_ok(f"{PREFIX}/scope-07/{leaf}", json.dumps(body), retain=retain)


def chart_ink(page: Page) -> int:
    """Pixels of the uPlot canvas that are not transparent (0: nothing drawn)."""
    return int(
        page.evaluate(
            """() => {
              const c = document.querySelector('#chart canvas');
              if (!c) return 0;
              const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
              let n = 0;
              for (let i = 3; i < d.length; i += 4) if (d[i] > 0) n++;
              return n;
            }"""
        )
    )


def test_dashboard_shows_devices_results_and_spectrum(
    broker: RunningBroker, site: str, page: Page
) -> None:
    appliance = Peer(broker, "scope-07", DEVICE_PW, cert="scope-07").connect()
    try:
        assert appliance.connected.is_set(), broker.log_text()[-800:]
        # Retained state is published before the page exists: the page must still get it.
        assert appliance.publish_ok(f"{PREFIX}/scope-07/availability", "online", retain=True)
        publish_json(appliance, "status", status_payload("idle"), "status", retain=True)
        store = {"schema": "omis.ota_state/1", "current": 3, "previous": 2, "pending": None}
        publish_json(appliance, "ota/state", {**store, "last_outcome": None}, "ota_state", True)

        query = urlencode(
            {
                "broker": f"wss://localhost:{broker.tree.dashboard_port}/mqtt",
                "username": "dashboard",
                "password": DASH_PW,
                "prefix": PREFIX,
            }
        )
        page.goto(f"{site}/index.html?{query}")
        conn = page.locator("#conn")
        expect(conn).to_have_attribute("data-state", "connected", timeout=10_000)

        card = page.locator('article.device[data-device="scope-07"]')
        expect(card.locator(".availability")).to_have_text("online", timeout=5_000)
        expect(card.locator(".state")).to_have_text("idle")
        expect(card.locator(".fact-model dd")).to_have_text("omis-vgg16 v3")
        expect(card.locator(".fact-engine dd")).to_have_text("tensorrt fp16")
        expect(card.locator(".fact-ota dd")).to_have_text("current v3, previous v2")

        first, second = result_payload(1, "S-0001", 0.92), result_payload(2, "S-0002", 0.18)
        publish_json(appliance, "result", first, "result")
        publish_json(appliance, "result", second, "result")
        third = result_payload(3, "S-0003", 0.55, abstained=True)
        publish_json(appliance, "result", third, "result")
        publish_json(appliance, "status", status_payload("scanning"), "status", retain=True)

        rows = page.locator("#results tbody tr")
        expect(rows).to_have_count(3, timeout=5_000)
        unsure = page.locator(f'tr[data-message-id="{third["message_id"]}"]')
        expect(unsure.locator("td.label")).to_have_text("abstained (leans high)")
        expect(unsure.locator("td.phigh")).to_have_text("0.550")  # p(high), whatever the label
        newest = page.locator(f'tr[data-message-id="{second["message_id"]}"]')
        expect(newest.locator("td.label")).to_have_text("low")
        expect(newest.locator("td.phigh")).to_have_text("0.180")
        expect(newest.locator("td.model")).to_have_text("omis-vgg16 v3")
        older = page.locator(f'tr[data-message-id="{first["message_id"]}"]')
        expect(older.locator("td.label")).to_have_text("high")
        expect(older.locator("td.phigh")).to_have_text("0.920")
        expect(older.locator("td.slide")).to_have_text("S-0001")
        expect(rows.first).to_have_attribute("data-message-id", third["message_id"])
        expect(card.locator(".counts")).to_have_text("3 result(s) · high 1 · low 1 · abstained 1")
        expect(card.locator(".state")).to_have_text("scanning")

        # The chart follows the newest result; tapping a row shows that row's spectrum.
        expect(page.locator("#chart")).to_have_attribute("data-ready", "true")
        expect(page.locator("#chart-caption")).to_contain_text("S-0003 · abstained")
        assert chart_ink(page) > 500, "the spectrum chart drew nothing"
        assert older.locator("svg.sparkline polyline").count() == 1
        older.click()
        expect(page.locator("#chart-caption")).to_contain_text("S-0001")
        expect(older).to_have_class("selected")

        # Live availability: the broker's will / a clean stop turns the card.
        assert appliance.publish_ok(f"{PREFIX}/scope-07/availability", "stopped", retain=True)
        expect(card.locator(".availability")).to_have_text("stopped", timeout=5_000)

        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "dashboard.png"), full_page=True)
        page.set_viewport_size({"width": 400, "height": 860})  # a phone / small tablet
        page.screenshot(path=str(ARTIFACTS / "dashboard-narrow.png"), full_page=True)
        assert page.evaluate("document.documentElement.scrollWidth") <= 400 + 1
    finally:
        appliance.close()


def test_dashboard_reports_refused_credentials(
    broker: RunningBroker, site: str, page: Page
) -> None:
    query = urlencode(
        {
            "broker": f"wss://localhost:{broker.tree.dashboard_port}/mqtt",
            "username": "dashboard",
            "password": "wrong",
        }
    )
    page.goto(f"{site}/index.html?{query}")
    conn = page.locator("#conn")
    expect(conn).to_have_attribute("data-state", "error", timeout=10_000)
    expect(conn).to_contain_text("uthori")  # "Not authorized" / "Bad User Name or Password"
    # Nothing was remembered: the password came from the URL, not from the form.
    assert page.evaluate("localStorage.getItem('omis-dashboard.settings')") is None
