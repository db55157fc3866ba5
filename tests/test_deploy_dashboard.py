"""The dashboard (deploy/dashboard/) in headless Chromium against the production broker config.

mosquitto runs the rendered production configuration (MQTT over WebSockets over TLS for the
dashboard, certificate + password for devices); the page is served as static files; a
simulated appliance (paho, client certificate) publishes availability, a retained status and
``omis.result/1`` payloads that pass the shipped JSON Schemas.  The page must show the device,
its state, model and model-store versions, the result rows (label, probability, abstained,
model version), per-device counts, and draw the spectrum with uPlot.  Screenshots go to
test-artifacts/ for a person to look at.

The static server answers like a hardened one: a strict Content-Security-Policy (no inline
script or style) on every file, and ``config.json`` naming the broker (the page takes no
endpoint from its URL).  Debian's chromium is driven by Playwright for Python (the ``chromium``
and ``page`` fixtures in conftest.py).  deploy/dashboard/node_modules comes from
``scripts/dashboard-deps.sh``.
"""

from __future__ import annotations

import functools
import json
import math
import re
import socket
import threading
import uuid
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
from playwright.sync_api import Page, expect

from deploy.broker import free_port
from deploy.collector.service import VENDORED
from deploy.messages.testing import ota_state_message, result_json, status_message
from deploy.schemas import validate

DASHBOARD = ROOT / "deploy" / "dashboard"
ARTIFACTS = ROOT / "test-artifacts"
PREFIX = "omis/v1"
SHA = "5e" * 32
DEVICE_PW = "pw-scope-07"
DASH_PW = "pw-dashboard"
# What a hardened server sends (docs/security.md): the page must work under it unchanged.
STRICT_CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
    "connect-src 'self' ws: wss:; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
)


class _QuietHandler(SimpleHTTPRequestHandler):
    """The dashboard's files with a strict CSP, and the server's ``config.json``."""

    config_body = b"{}"

    def do_GET(self) -> None:
        if self.path.split("?")[0] == "/config.json":
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(self.config_body)))
            self.end_headers()
            self.wfile.write(self.config_body)
            return
        super().do_GET()

    def end_headers(self) -> None:
        self.send_header("Content-Security-Policy", STRICT_CSP)
        super().end_headers()

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
def site(broker: RunningBroker) -> Iterator[str]:
    """deploy/dashboard served as static files (the dev option of docs/dashboard.md)."""
    vendored = DASHBOARD / "node_modules" / "mqtt" / "dist" / "mqtt.min.js"
    assert vendored.is_file(), "run scripts/dashboard-deps.sh (npm ci) first"
    config = {"broker_url": f"wss://localhost:{broker.tree.dashboard_port}/mqtt", "prefix": PREFIX}
    handler_class = type("Handler", (_QuietHandler,), {"config_body": json.dumps(config).encode()})
    handler = functools.partial(handler_class, directory=str(DASHBOARD))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    thread.join(5)


def sign_in_to_broker(page: Page, site: str, password: str, remember: bool = False) -> None:
    """Open the page (no archive behind a static server) and connect with the form."""
    page.goto(f"{site}/index.html")
    form = page.locator("#settings")
    expect(form).to_be_visible(timeout=10_000)
    expect(form.locator("#broker-url")).to_contain_text("wss://localhost:")
    form.locator("input[name=username]").fill("dashboard")
    form.locator("input[name=password]").fill(password)
    if remember:
        form.locator("input[name=remember]").check()
    form.locator("button[type=submit]").click()


def status_payload(state: str) -> dict[str, Any]:
    return status_message(
        state,
        model={"name": "omis-vgg16", "version": 3, "sha256": SHA},
        engine={"name": "tensorrt", "precision": "fp16"},
        firmware={"name": "omis-fw", "version": "1.2.0"},
    ).to_json()


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
        store = ota_state_message(3, 2).to_json()
        publish_json(appliance, "ota/state", store, "ota_state", True)

        sign_in_to_broker(page, site, DASH_PW)
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
        counts = "Since this page opened: 3 result(s) · high 1 · low 1 · abstained 1"
        expect(card.locator(".counts")).to_have_text(counts)
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
    sign_in_to_broker(page, site, "wrong")
    conn = page.locator("#conn")
    expect(conn).to_have_attribute("data-state", "error", timeout=10_000)
    expect(conn).to_contain_text("uthori")  # "Not authorized" / "Bad User Name or Password"
    # Nothing was remembered: "remember" was not ticked.
    stored = page.evaluate("localStorage.getItem('omis-dashboard.broker')")
    assert "password" not in json.loads(stored or "{}")


class Listener:
    """A second local server (the attacker's): counts every connection and keeps its bytes."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.sock.getsockname()[1])
        self.received: list[bytes] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(1)
                try:
                    self.received.append(conn.recv(65536))
                except OSError:
                    self.received.append(b"")

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def attacker() -> Iterator[Listener]:
    listener = Listener()
    yield listener
    listener.close()


def test_crafted_link_sends_no_credentials_elsewhere(
    broker: RunningBroker, site: str, page: Page, attacker: Listener
) -> None:
    """Issue 20: ``?broker=``/``?api=`` pointing elsewhere must not receive the password.

    The page remembers the broker password (ticked by the user), an older version's settings
    (with a URL and the password) are in localStorage too; then a crafted link is opened.
    """
    sign_in_to_broker(page, site, DASH_PW, remember=True)
    expect(page.locator("#conn")).to_have_attribute("data-state", "connected", timeout=10_000)
    evil = f"127.0.0.1:{attacker.port}"
    legacy = {
        "url": f"ws://{evil}/mqtt", "api": f"http://{evil}/api", "username": "dashboard",
        "password": DASH_PW, "prefix": PREFIX, "remember": True,
    }  # fmt: skip
    page.evaluate(
        "(v) => localStorage.setItem('omis-dashboard.settings', JSON.stringify(v))", legacy
    )
    query = urlencode(
        {
            "broker": f"ws://{evil}/mqtt",
            "url": f"ws://{evil}/mqtt",
            "api": f"http://{evil}/api",
            "username": "dashboard",
            "password": DASH_PW,
        }
    )
    page.goto(f"{site}/index.html?{query}")
    # The remembered password still works, for the configured broker only.
    conn = page.locator("#conn")
    expect(conn).to_have_attribute("data-state", "connected", timeout=10_000)
    expect(conn).to_contain_text(f"wss://localhost:{broker.tree.dashboard_port}/mqtt")
    page.locator("#filters button[type=submit]").click()  # anything that talks to an API
    page.wait_for_load_state("networkidle")
    assert attacker.received == [], f"sent to {evil}: {attacker.received!r}"
    assert page.evaluate("localStorage.getItem('omis-dashboard.settings')") is None


def hostile_results() -> list[dict[str, Any]]:
    """Results whose fields have every unexpected type (the schema is not enforced on the way)."""
    base = result_payload(1, "S-H", 0.7)
    variants: list[dict[str, Any]] = [
        {"fields": [{"index": 0, "valid_fraction": 0.5, "quality": "reject", "reasons": "blur"}]},
        {"fields": {"0": "not a list"}},
        {"fields": [None, 7, "x", {"index": {"a": 1}, "valid_fraction": "0.5", "reasons": {}}]},
        {"prediction": "high"},
        {"prediction": {"label": 1, "risk": ["high"], "p_high": "0.9", "probabilities": []}},
        {"slide_id": 12345, "device_id": None, "finished_at": 17},
        {"spectrum": {"axis": "abc", "values": {"x": 1}}},
        {"spectrum": {"axis": [1, "2", None], "values": [0.1, None, "x"], "x_range_nm": ["a", 1]}},
        {"model": "omis", "outcome": 5, "reason": {"x": 1}},
        {"outcome": "failed", "stage": ["acquire"], "prediction": None, "spectrum": None},
    ]
    out = []
    for i, change in enumerate(variants):
        body = {**base, **change, "message_id": str(uuid.uuid4()), "seq": 10 + i}
        if "slide_id" not in change:
            body["slide_id"] = f"<img src=x onerror=alert({i})>"
        out.append(body)
    return out


def test_hostile_payloads_neither_throw_nor_inject(
    broker: RunningBroker, site: str, page: Page
) -> None:
    appliance = Peer(broker, "scope-07", DEVICE_PW, cert="scope-07").connect()
    try:
        assert appliance.connected.is_set(), broker.log_text()[-800:]
        sign_in_to_broker(page, site, DASH_PW)
        expect(page.locator("#conn")).to_have_attribute("data-state", "connected", timeout=10_000)
        bodies = hostile_results()
        for body in bodies:
            assert appliance.publish_ok(f"{PREFIX}/scope-07/result", json.dumps(body))
        status = {**status_payload("idle"), "queue": "full", "engine": 5, "last_error": "boom"}
        assert appliance.publish_ok(f"{PREFIX}/scope-07/status", json.dumps(status))
        ota: dict[str, Any] = {
            "schema": "omis.ota_state/1", "current": "3", "previous": {}, "pending": None,
            "last_outcome": {"result": ["x"], "version": "v"}, "models": [], "progress": 1,
        }  # fmt: skip
        assert appliance.publish_ok(f"{PREFIX}/scope-07/ota/state", json.dumps(ota))
        rows = page.locator("#results tbody tr")
        expect(rows).to_have_count(len(bodies), timeout=10_000)
        # Each row opens without an error; the reasons string is shown as it is.
        for i in range(len(bodies)):
            rows.nth(i).click()
            expect(rows.nth(i)).to_have_class("selected")
        page.locator(f'tr[data-message-id="{bodies[0]["message_id"]}"]').click()
        expect(page.locator("#qc tbody tr").first.locator(".reasons")).to_have_text("blur")
        expect(page.locator("#ignored")).to_be_hidden()
        assert page.locator("#results img").count() == 0  # shown as text, never as markup
        card = page.locator('article.device[data-device="scope-07"]')
        expect(card.locator(".state")).to_have_text("idle")
    finally:
        appliance.close()


def test_ota_panel_follows_install_and_local_rollback(
    broker: RunningBroker, site: str, page: Page
) -> None:
    """The OTA panel: step, last outcome, rollbacks, serving and previous versions; after a
    local rollback the card names the version the store serves, not the stale status's."""
    appliance = Peer(broker, "scope-07", DEVICE_PW, cert="scope-07").connect()
    try:
        assert appliance.connected.is_set(), broker.log_text()[-800:]
        sign_in_to_broker(page, site, DASH_PW)
        expect(page.locator("#conn")).to_have_attribute("data-state", "connected", timeout=10_000)
        status = status_payload("updating")
        status["model"] = {"name": "omis-vgg16", "version": 3, "sha256": SHA}
        publish_json(appliance, "status", status, "status", retain=True)

        def model(version: int) -> dict[str, Any]:
            return {"name": "omis-vgg16", "version": version, "sha256": SHA, "signer": "ab12"}

        at = "2026-01-01T10:00:00Z"
        committed = {"result": "committed", "version": 3, "reason": "", "at": at}
        installing = ota_state_message(
            3, 2, 4, last_outcome=committed, generation=5, step="verifying",
            models={"current": model(3), "previous": model(2), "pending": model(4)},
            progress={"step": "verifying", "correlation_id": "c-1", "name": "m", "version": 4},
        ).to_json()  # fmt: skip
        publish_json(appliance, "ota/state", installing, "ota_state", retain=True)
        ota = page.locator('article.device[data-device="scope-07"] .ota')
        expect(ota.locator(".fact-step dd")).to_have_text("verifying (v4)", timeout=5_000)
        expect(ota.locator(".fact-serving dd")).to_have_text("omis-vgg16 v3 (v4 being installed)")
        expect(ota.locator(".fact-previous dd")).to_have_text("omis-vgg16 v2")
        expect(ota.locator(".fact-last dd")).to_have_text("committed v3, 2026-01-01 11:00:00 GMT+1")
        expect(ota.locator(".fact-rollbacks dd")).to_have_text("none in the last update")

        # v4 was switched to, failed its health check and was rolled back on the device; the
        # retained status still names v4 (it is republished with the next slide).
        status["model"] = model(4)
        publish_json(appliance, "status", status, "status", retain=True)
        rolled = ota_state_message(
            3, None, None, generation=7,
            models={"current": model(3), "previous": None, "pending": None},
            last_outcome={
                "result": "rolled_back", "version": 4, "reason": "golden outputs differ",
                "at": "2026-01-01T10:05:00Z",
            },
        ).to_json()  # fmt: skip
        publish_json(appliance, "ota/state", rolled, "ota_state", retain=True)
        card = page.locator('article.device[data-device="scope-07"]')
        expect(ota.locator(".fact-step dd")).to_have_text("idle", timeout=5_000)
        expect(ota.locator(".fact-serving dd")).to_have_text("omis-vgg16 v3")
        expect(ota.locator(".fact-previous dd")).to_have_text("none")
        expect(ota.locator(".fact-last dd")).to_have_text(
            "rolled back from v4: golden outputs differ, 2026-01-01 11:05:00 GMT+1"
        )
        expect(ota.locator(".fact-rollbacks dd")).to_have_text(
            "last update rolled back from v4 (golden outputs differ)"
        )
        expect(card.locator(".fact-model dd")).to_have_text("omis-vgg16 v3")
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "dashboard-ota.png"), full_page=True)
    finally:
        appliance.close()


def test_every_package_file_a_page_loads_is_locked_installed_and_checked() -> None:
    """What the pages load from node_modules: pinned in package.json and package-lock.json,
    installed by scripts/dashboard-deps.sh, and among the files ``omis collect`` checks before
    it serves the packaged dashboard."""
    loaded = {
        Path(match)
        for page in DASHBOARD.glob("*.html")
        for match in re.findall(r'(?:src|href)="(node_modules/[^"]+)"', page.read_text("utf-8"))
    }
    assert loaded, "no page loads a package file?"
    assert loaded == set(VENDORED)
    manifest = json.loads((DASHBOARD / "package.json").read_text("utf-8"))["dependencies"]
    lock = json.loads((DASHBOARD / "package-lock.json").read_text("utf-8"))["packages"]
    for path in loaded:
        package = path.parts[1]
        assert lock[""]["dependencies"][package] == manifest[package]
        assert lock[f"node_modules/{package}"]["version"] == manifest[package]
        assert (DASHBOARD / path).is_file(), f"{path}: run scripts/dashboard-deps.sh"
