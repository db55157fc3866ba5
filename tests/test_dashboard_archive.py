"""The dashboard with the archive: history, filters, CSV, detail, zoom, operator commands, alerts.

Everything is real: mosquitto with the production configuration (TLS, passwords, ACLs), the
collector (``omis collect``: svc.ingest account over mqtts, SQLite, HTTP API serving the page),
the appliance daemon (fake scanner) over mqtts for the operator's scan/cancel round trip, and
Debian's Chromium driven by Playwright in the Europe/Berlin time zone.
"""

from __future__ import annotations

import json
import math
import os
import signal
import threading
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import httpx
import pytest
from broker_support import app_config, appliance_child, wait_until
from deploy_support import DASHBOARD_PORT, DEVICE_PORT, Peer, RunningBroker, dev_broker_module
from playwright.sync_api import Page, expect, sync_playwright
from test_deploy_dashboard import ARTIFACTS, CHROMIUM, CHROMIUM_FLAGS

from deploy.broker import free_port
from deploy.collector.auth import hash_password
from deploy.collector.config import load_collector_config
from deploy.collector.service import ArchiveService
from deploy.messages.testing import result_json
from deploy.schemas import validate

PREFIX = "omis/v1"
SHA = "5e" * 32
PW = {"scope-07": "pw-dev", "svc.ingest": "pw-ingest", "dashboard": "pw-dash", "operator": "pw-op"}


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[RunningBroker]:
    tree = dev_broker_module().build_dev_broker(
        tmp_path / "broker",
        devices={"scope-07": PW["scope-07"]},
        users={"dashboard": PW["dashboard"], "operator": PW["operator"]},
        ports={DEVICE_PORT: free_port(), DASHBOARD_PORT: free_port()},
        services={"svc.ingest": PW["svc.ingest"]},
    )
    running = RunningBroker(tree).start()
    yield running
    running.stop()


def tls_for(broker: RunningBroker, name: str) -> dict[str, Any]:
    cert = broker.tree.clients[name]
    return {
        "ca_file": str(broker.tree.ca_cert),
        "cert_file": str(cert.cert),
        "key_file": str(cert.key),
    }


@pytest.fixture
def archive(broker: RunningBroker, tmp_path: Path) -> Iterator[ArchiveService]:
    accounts = [
        {"name": "dashboard", "role": "viewer", "password_hash": hash_password(PW["dashboard"])},
        {"name": "operator", "role": "operator", "password_hash": hash_password(PW["operator"])},
    ]
    config = load_collector_config(
        environ={},
        overrides={
            "mqtt": {
                "broker": f"mqtts://localhost:{broker.tree.device_port}",
                "username": "svc.ingest",
                "password": PW["svc.ingest"],
                "client_id": "archive-dash",
                "tls": tls_for(broker, "svc.ingest"),
            },
            "http": {
                "port": free_port(),
                "accounts": accounts,
                # the page's CSP lets it connect to this broker socket only
                "dashboard_broker_url": f"wss://localhost:{broker.tree.dashboard_port}/mqtt",
            },
        },
    )
    service = ArchiveService(config, tmp_path / "archive")
    stop = threading.Event()
    service.start()
    runner = threading.Thread(target=service.run, args=(stop,))
    runner.start()
    assert service.subscriber is not None
    assert service.subscriber.connected.wait(10), broker.log_text()[-1500:]
    yield service
    stop.set()
    runner.join(10)
    service.close()


@pytest.fixture
def page(tmp_path: Path) -> Iterator[Page]:
    with sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"),
            executable_path=CHROMIUM,
            args=CHROMIUM_FLAGS,
            ignore_https_errors=True,
            viewport={"width": 1180, "height": 1000},
            timezone_id="Europe/Berlin",
            accept_downloads=True,
        )
        page = context.pages[0] if context.pages else context.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        yield page
        context.close()
        assert errors == [], f"JavaScript errors on the page: {errors}"


def result(seq: int, slide: str, high: float, **kw: Any) -> dict[str, Any]:
    """A result whose signal sits within +-15 nm of a +-145 nm axis (as real spectra do), built
    by the device's own builders (``kw``: ``outcome``, ``reason``, ``stage``)."""
    axis = [float(x) for x in range(-145, 146, 1)]
    values = [round(math.exp(-((x / 6.0) ** 2)), 5) for x in axis]
    fields = [
        {"index": 0, "valid_fraction": 0.93, "quality": "ok", "reasons": []},
        {"index": 1, "valid_fraction": 0.12, "quality": "reject", "reasons": ["out of focus"]},
    ]
    kind = kw.get("outcome", "classified")
    shape = {"fields": fields, "axis": axis, "values": values, "timings_ms": {"total": 420.5}}
    body = result_json(
        seq,
        slide=slide,
        p_high=high,
        started_at="2026-01-01T12:00:00.000Z",
        finished_at=f"2026-01-01T12:00:0{seq}.000Z",
        model={"name": "omis-vgg16", "version": 3, "sha256": SHA},
        **kw,
        **(shape if kind in ("classified", "abstained") else {}),
    )
    validate("result", body)
    return body


def dashboard_url(archive: ArchiveService, broker: RunningBroker, user: str) -> str:
    query = {
        "broker": f"wss://localhost:{broker.tree.dashboard_port}/mqtt",
        "username": user,
        "password": PW[user],
    }
    return f"{archive.http_url}index.html?{urlencode(query)}"


def device_peer(broker: RunningBroker) -> Peer:
    peer = Peer(broker, "scope-07", PW["scope-07"], cert="scope-07").connect()
    assert peer.connected.is_set(), broker.log_text()[-800:]
    return peer


def stored(archive: ArchiveService) -> int:
    total: int = httpx.get(f"{archive.http_url}api/results", timeout=10).json()["total"]
    return total


def test_history_filters_csv_detail_and_zoom(
    broker: RunningBroker, archive: ArchiveService, page: Page, tmp_path: Path
) -> None:
    device = device_peer(broker)
    try:
        high = result(1, "S-0001", 0.92)
        low = result(2, "S-0002", 0.18)
        unsure = result(3, "S-0003", 0.55, outcome="abstained", reason="uncertain_probability")
        failed = result(4, "S-0004", 0.1, outcome="failed", stage="acquire", reason="focus lost")
        for body in (high, low, unsure, failed):
            assert device.publish_ok(f"{PREFIX}/scope-07/result", json.dumps(body))
        assert device.publish_ok(f"{PREFIX}/scope-07/availability", "online", retain=True)
        assert wait_until(lambda: stored(archive) == 4, 20)
    finally:
        device.close()  # the page below sees history only: nothing is live any more

    page.goto(dashboard_url(archive, broker, "dashboard"))
    rows = page.locator("#results tbody tr")
    expect(rows).to_have_count(4, timeout=10_000)
    page.reload()  # history survives a reload
    expect(rows).to_have_count(4, timeout=10_000)
    expect(page.locator("#history-note")).to_contain_text("4 archived result(s)")

    high_row = page.locator(f'tr[data-message-id="{high["message_id"]}"]')
    expect(high_row.locator("td.time")).to_have_text("2026-01-01 13:00:01 GMT+1")  # UTC 12:00
    expect(high_row.locator("td.phigh")).to_have_text("0.920")
    expect(high_row.locator("td.outcome")).to_have_text("classified")
    unsure_row = page.locator(f'tr[data-message-id="{unsure["message_id"]}"]')
    expect(unsure_row.locator("td.outcome")).to_contain_text("abstained")
    expect(unsure_row.locator("td.outcome .reason")).to_have_text("uncertain_probability")
    expect(unsure_row.locator("td.phigh")).to_have_text("0.550")
    failed_row = page.locator(f'tr[data-message-id="{failed["message_id"]}"]')
    expect(failed_row.locator("td.outcome .reason")).to_have_text("at acquire: focus lost")
    expect(page.locator(".commands").first).to_be_hidden()  # a viewer gets no command buttons
    expect(page.locator("li.alert-high_risk")).to_contain_text("S-0001")  # from the archive

    # The slide detail: outcome, reason and per-field QC; the chart zoomed to the signal.
    unsure_row.click()
    detail = page.locator("#detail")
    expect(detail.locator(".fact-outcome dd")).to_have_text("abstained: uncertain_probability")
    qc = detail.locator("#qc tbody tr")
    expect(qc).to_have_count(2)
    expect(qc.nth(1)).to_contain_text("reject")
    expect(qc.nth(1)).to_contain_text("out of focus")
    expect(qc.nth(1)).to_contain_text("12.0 %")
    chart = page.locator("#chart")
    expect(chart).to_have_attribute("data-ready", "true")
    assert -40 < float(chart.get_attribute("data-xmin") or "nan") < -10
    assert 10 < float(chart.get_attribute("data-xmax") or "nan") < 40
    zoom = page.locator("#chart-zoom")
    zoom.click()
    expect(zoom).to_have_attribute("aria-pressed", "true")
    expect(chart).to_have_attribute("data-xmin", "-145")
    expect(chart).to_have_attribute("data-xmax", "145")
    zoom.click()
    expect(zoom).to_have_attribute("aria-pressed", "false")

    # Filters and search go to the archive.
    filters = page.locator("#filters")
    filters.locator("select[name=outcome]").select_option("abstained")
    filters.locator("button[type=submit]").click()
    expect(rows).to_have_count(1)
    expect(rows.first.locator("td.slide")).to_have_text("S-0003")
    filters.locator("button[type=reset]").click()
    expect(rows).to_have_count(4)
    filters.locator("input[name=slide]").fill("s-0002")
    filters.locator("input[name=slide]").press("Enter")
    expect(rows).to_have_count(1)
    expect(rows.first.locator("td.slide")).to_have_text("S-0002")
    filters.locator("select[name=review]").select_option("true")
    filters.locator("input[name=slide]").fill("")
    filters.locator("button[type=submit]").click()
    expect(rows).to_have_count(2)

    # CSV of what the filters select.
    with page.expect_download() as info:
        page.locator("#export").click()
    saved = tmp_path / "export.csv"
    info.value.save_as(saved)
    lines = saved.read_text("utf-8").strip().splitlines()
    assert lines[0].startswith("message_id,device_id,")
    assert sorted(line.split(",")[4] for line in lines[1:]) == ["S-0003", "S-0004"]

    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "dashboard-archive.png"), full_page=True)


def _high_slide() -> str:
    """A slide id the fake scanner classifies high risk (p(high) from its CRC)."""
    return next(f"OP-{i}" for i in range(1000) if zlib.crc32(f"OP-{i}".encode()) % 1000 >= 600)


def test_operator_commands_live_alerts_offline_and_decommissioning(
    broker: RunningBroker, archive: ArchiveService, page: Page, tmp_path: Path
) -> None:
    config = app_config(
        f"mqtts://localhost:{broker.tree.device_port}",
        device="scope-07",
        mqtt={
            "username": "scope-07",
            "password": PW["scope-07"],
            "tls": tls_for(broker, "scope-07"),
        },
    )
    appliance = appliance_child(config, tmp_path / "device", [], delay_s=1.5)
    try:
        assert appliance.stdout is not None
        assert appliance.stdout.readline().strip() == "READY"
        page.goto(dashboard_url(archive, broker, "operator"))
        card = page.locator('article.device[data-device="scope-07"]')
        expect(card.locator(".availability")).to_have_text("online", timeout=10_000)
        commands = card.locator(".commands")
        expect(commands).to_be_visible(timeout=10_000)

        # Scan, then cancel it while it runs: both replies are shown.
        commands.locator("input[name=slide]").fill("OP-CANCEL")
        commands.locator("button.scan").click()
        reply = commands.locator(".reply")
        expect(reply).to_contain_text("scan OP-CANCEL: accepted", timeout=10_000)
        commands.locator("button.cancel").click()
        expect(reply).to_contain_text("cancel: cancelled", timeout=10_000)
        commands.locator("button.cancel").click()  # nothing runs any more
        expect(reply).to_contain_text("refused (not_found)", timeout=10_000)

        # A scan that finishes: its result arrives live, high risk, with an alert.
        slide = _high_slide()
        commands.locator("input[name=slide]").fill(slide)
        commands.locator("button.scan").click()
        expect(reply).to_contain_text(f"scan {slide}: accepted", timeout=10_000)
        row = page.locator("#results tbody tr", has_text=slide)
        expect(row).to_have_count(1, timeout=20_000)
        alert = page.locator("li.alert-high_risk", has_text=slide)
        expect(alert).to_be_visible()
        alert.locator("button.dismiss").click()
        expect(alert).to_have_count(0)

        # The appliance dies: the broker publishes its will, the page raises an alert.
        os.kill(appliance.pid, signal.SIGKILL)
        appliance.wait(10)
        expect(card.locator(".availability")).to_have_text("offline", timeout=20_000)
        expect(page.locator("li.alert-offline", has_text="scope-07")).to_be_visible()
    finally:
        if appliance.poll() is None:
            appliance.kill()
            appliance.wait(10)

    # Decommissioning (docs/scale.md): the card and its alerts go, nothing is "malformed".
    device = device_peer(broker)
    try:
        for leaf in ("availability", "status", "ota/state"):
            assert device.publish_ok(f"{PREFIX}/scope-07/{leaf}", "", retain=True)
    finally:
        device.close()
    expect(page.locator('article.device[data-device="scope-07"]')).to_have_count(0, timeout=10_000)
    expect(page.locator("li.alert-offline")).to_have_count(0)
    expect(page.locator("#ignored")).to_be_hidden()
    expect(page.locator("#no-devices")).to_be_visible()
