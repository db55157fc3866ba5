"""The dashboard with the archive: login, history, filters, CSV, detail, zoom, operator
commands, the worklist with sign-out and amendment, alert acknowledgement.

Everything is real: mosquitto with the production configuration (TLS, passwords, ACLs), the
collector (``omis collect``: svc.ingest account over mqtts, SQLite, HTTP API serving the page,
users in its database, login sessions), the appliance daemon (fake scanner) over mqtts for the
operator's scan/cancel round trip, and Debian's Chromium driven by Playwright in the
Europe/Berlin time zone (the ``chromium``/``page`` fixtures of conftest.py).  The people sign in
through the page's login form; the page takes the broker from the archive's ``config.json`` and
signs in there with the same name and password (the broker's ``users.passwd``).  PostgreSQL is
covered by the API tests of the review routes.
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

import httpx
import pytest
from broker_support import app_config, appliance_child, wait_until
from deploy_support import DASHBOARD_PORT, DEVICE_PORT, Peer, RunningBroker, dev_broker_module
from playwright.sync_api import Page, expect
from test_deploy_dashboard import ARTIFACTS

from deploy.broker import free_port
from deploy.collector.audit import Actor
from deploy.collector.auth import UserStore
from deploy.collector.config import load_collector_config
from deploy.collector.service import ArchiveService
from deploy.fleet.store import BundleRef, FleetStore
from deploy.messages.testing import ota_state_message, result_json
from deploy.schemas import validate

PREFIX = "omis/v1"
SHA = "5e" * 32
PW = {
    "scope-07": "pw-dev", "svc.ingest": "pw-ingest", "dashboard": "pw-dash", "operator": "pw-op",
    "alice": "pw-älice-✓",  # a cytotechnologist; UTF-8 on purpose
    "bob": "pw-bob",  # a pathologist
    "root": "pw-root",  # an admin: reads the audit trail (no broker account)
}  # fmt: skip
ROLES = {"dashboard": "viewer", "operator": "operator", "alice": "cytotech", "bob": "pathologist"}


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[RunningBroker]:
    tree = dev_broker_module().build_dev_broker(
        tmp_path / "broker",
        devices={"scope-07": PW["scope-07"]},
        users={name: PW[name] for name in ROLES},
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
                "require_auth_on_localhost": True,  # the browser runs here too: log in anyway
                "dashboard_broker_url": f"wss://localhost:{broker.tree.dashboard_port}/mqtt",
            },
            "review": {"qc_sample_share": 1.0},  # every classified-low slide is rescreened
        },
    )
    service = ArchiveService(config, tmp_path / "archive")
    stop = threading.Event()
    service.start()
    people = UserStore(service.engines[0])
    for name, role in ROLES.items():
        people.add(name, role, PW[name], Actor("test-setup", "admin", None))
    people.add("root", "admin", PW["root"], Actor("test-setup", "admin", None))
    runner = threading.Thread(target=service.run, args=(stop,))
    runner.start()
    assert service.subscriber is not None
    assert service.subscriber.connected.wait(10), broker.log_text()[-1500:]
    yield service
    stop.set()
    runner.join(10)
    service.close()


def result(seq: int, slide: str, high: float, **kw: Any) -> dict[str, Any]:
    """A result whose signal sits within +-15 nm of a +-145 nm axis (as real spectra do), built
    by the device's own builders (``kw``: ``outcome``, ``reason``, ``stage``, ``finished_at``)."""
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
        finished_at=kw.pop("finished_at", f"2026-01-01T12:00:0{seq}.000Z"),
        model={"name": "omis-vgg16", "version": 3, "sha256": SHA},
        **kw,
        **(shape if kind in ("classified", "abstained") else {}),
    )
    validate("result", body)
    return body


def sign_in(
    page: Page,
    archive: ArchiveService,
    user: str,
    password: str | None = None,
    remember: bool = False,
) -> None:
    """Open the page and sign in through its login form."""
    page.goto(f"{archive.http_url}index.html")
    form = page.locator("#login-form")
    expect(form).to_be_visible(timeout=10_000)
    form.locator("input[name=username]").fill(user)
    form.locator("input[name=password]").fill(PW[user] if password is None else password)
    if remember:
        form.locator("input[name=remember]").check()
    form.locator("button[type=submit]").click()


def signed_in(page: Page, user: str) -> None:
    expect(page.locator("#who")).to_have_text(f"{user} ({ROLES[user]})", timeout=10_000)
    expect(page.locator("#login")).to_be_hidden()


def api(archive: ArchiveService, path: str, user: str = "alice") -> Any:
    """GET from the archive as ``user`` (HTTP Basic, the programs' way)."""
    response = httpx.get(f"{archive.http_url}api/{path}", auth=(user, PW[user]), timeout=10)
    response.raise_for_status()
    return response.json()


def fleet_of(archive: ArchiveService, device: str) -> dict[str, Any]:
    """The fleet block ``GET /api/devices`` carries for ``device`` (empty when not listed)."""
    rows = {row["device_id"]: row for row in api(archive, "devices", "dashboard")}
    block: dict[str, Any] = rows.get(device, {}).get("fleet") or {}
    return block


def device_peer(broker: RunningBroker) -> Peer:
    peer = Peer(broker, "scope-07", PW["scope-07"], cert="scope-07").connect()
    assert peer.connected.is_set(), broker.log_text()[-800:]
    return peer


def stored(archive: ArchiveService) -> int:
    total: int = api(archive, "results", "dashboard")["total"]
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
        # an update of v4 that the device rolled back: the archive records it (fleet view)
        undo = {"result": "rolled_back", "version": 4, "reason": "health check failed"}
        progress = {"step": "rolled_back", "correlation_id": "ota-4", "version": 4}
        progress |= {"reason": undo["reason"]}
        state = ota_state_message(3, 2, last_outcome=undo, progress=progress).to_json()
        assert device.publish_ok(f"{PREFIX}/scope-07/ota/state", json.dumps(state), retain=True)
        assert wait_until(lambda: stored(archive) == 4, 20)
        assert wait_until(lambda: fleet_of(archive, "scope-07").get("rollbacks") == 1, 20)
    finally:
        device.close()  # the page below sees history only: nothing is live any more
    fleet = FleetStore(archive.engines[0])
    fleet.add_to_group("ward-3", ["scope-07"])
    rollout, _ = fleet.begin_rollout(
        BundleRef("cd" * 32, "omis-vgg16", 5), {}, [["scope-07"]], 1, 0
    )

    sign_in(page, archive, "dashboard")
    signed_in(page, "dashboard")
    rows = page.locator("#results tbody tr")
    expect(rows).to_have_count(4, timeout=10_000)
    page.reload()  # history survives a reload (the session cookie stays)
    expect(rows).to_have_count(4, timeout=10_000)
    signed_in(page, "dashboard")
    expect(page.locator("#history-note")).to_contain_text("4 archived result(s)")

    high_row = page.locator(f'#results tr[data-message-id="{high["message_id"]}"]')
    expect(high_row.locator("td.time")).to_have_text("2026-01-01 13:00:01 GMT+1")  # UTC 12:00
    expect(high_row.locator("td.phigh")).to_have_text("0.920")
    expect(high_row.locator("td.outcome")).to_have_text("classified")
    unsure_row = page.locator(f'#results tr[data-message-id="{unsure["message_id"]}"]')
    expect(unsure_row.locator("td.outcome")).to_contain_text("abstained")
    expect(unsure_row.locator("td.outcome .reason")).to_have_text("uncertain_probability")
    expect(unsure_row.locator("td.phigh")).to_have_text("0.550")
    failed_row = page.locator(f'#results tr[data-message-id="{failed["message_id"]}"]')
    expect(failed_row.locator("td.outcome .reason")).to_have_text("at acquire: focus lost")
    expect(page.locator(".commands").first).to_be_hidden()  # a viewer gets no command buttons
    expect(page.locator("li.alert-high_risk")).to_contain_text("S-0001")  # from the archive
    expect(page.locator("li.alert-high_risk button.ack")).to_be_hidden()  # a viewer may not ack

    # The OTA panel carries the archive's fleet view: groups, rollout, recorded rollbacks.
    ota_panel = page.locator('article.device[data-device="scope-07"] .ota')
    expect(ota_panel.locator(".fact-groups dd")).to_have_text("ward-3")
    expect(ota_panel.locator(".fact-rollout dd")).to_contain_text(f"#{rollout.id} to v5")
    expect(ota_panel.locator(".fact-rollout dd")).to_contain_text("wave 0 (canary)")
    expect(ota_panel.locator(".fact-rollbacks dd")).to_have_text(
        "1 recorded by the archive; last from v4 (health check failed)"
    )

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
        sign_in(page, archive, "operator")
        signed_in(page, "operator")
        expect(page.locator("#conn")).to_have_attribute("data-state", "connected", timeout=10_000)
        card = page.locator('article.device[data-device="scope-07"]')
        expect(card.locator(".availability")).to_have_text("online", timeout=10_000)
        commands = card.locator(".commands")
        expect(commands).to_be_visible(timeout=10_000)
        known = lambda: any(r["device_id"] == "scope-07" for r in api(archive, "devices", "root"))  # noqa: E731
        assert wait_until(known, 10)  # the archive stored the device (else a 404)

        # Scan, then cancel it while it runs: both replies are shown.
        commands.locator("input[name=slide]").fill("OP-CANCEL")
        commands.locator("button.scan").click()
        reply = commands.locator(".reply")
        expect(reply).to_contain_text("scan OP-CANCEL: accepted", timeout=10_000)
        commands.locator("button.cancel").click()
        expect(reply).to_contain_text("cancel: cancelled", timeout=10_000)
        commands.locator("button.cancel").click()  # nothing runs any more
        expect(reply).to_contain_text("refused (not_found)", timeout=10_000)

        # The page sent them through the archive API: who, what and the device's answer.
        scans = api(archive, "audit?action=command.scan", "root")["items"]
        assert [(e["user_name"], e["role"], e["target"]) for e in scans] == [
            ("operator", "operator", "scope-07")
        ]
        assert scans[0]["detail"]["command"]["slide_id"] == "OP-CANCEL"
        assert scans[0]["detail"]["reply"] == "ok"
        cancels = api(archive, "audit?action=command.cancel", "root")["items"]
        assert [e["detail"]["reply"] for e in cancels] == ["not_found", "ok"]  # newest first

        # A scan that finishes: its result arrives live, high risk, with an alert.
        slide = _high_slide()
        commands.locator("input[name=slide]").fill(slide)
        commands.locator("button.scan").click()
        expect(reply).to_contain_text(f"scan {slide}: accepted", timeout=10_000)
        row = page.locator("#results tbody tr", has_text=slide)
        expect(row).to_have_count(1, timeout=20_000)
        alert = page.locator("li.alert-high_risk", has_text=slide)
        expect(alert).to_be_visible(timeout=10_000)
        expect(alert.locator("button.ack")).to_be_hidden()  # high risk: cytotech and above

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


def report_status(archive: ArchiveService, message_id: str) -> str:
    """What the archive (and so its FHIR export) says the report is."""
    status: str = api(archive, f"results/{message_id}")["report_status"]
    return status


def test_login_worklist_sign_out_amend_and_acknowledge(
    broker: RunningBroker, archive: ArchiveService, page: Page
) -> None:
    """A cytotechnologist signs in, works the worklist, signs a slide out, amends it and
    acknowledges its alert; the page says what the archive says at every step."""
    device = device_peer(broker)
    try:
        high = result(1, "S-0001", 0.92)
        low = result(2, "S-0002", 0.18)  # classified low: drawn for the QC rescreen (share 1.0)
        unsure = result(3, "S-0003", 0.55, outcome="abstained", reason="uncertain_probability")
        cancelled = result(4, "S-0004", 0.1, outcome="cancelled", reason="operator")
        cancelled["prediction"] = {"label": None, "probabilities": {}, "risk": None}
        cancelled["prediction"]["abstained"] = True
        validate("result", cancelled)
        gaps = [  # seq 5, 7, 9 and 11 never arrive: four gap alerts
            result(seq, f"S-01{seq}", 0.2, finished_at=f"2026-01-01T12:00:{40 + seq}.000Z")
            for seq in (6, 8, 10, 12)
        ]
        for body in (high, low, unsure, cancelled, *gaps):
            assert device.publish_ok(f"{PREFIX}/scope-07/result", json.dumps(body))
        assert wait_until(lambda: stored(archive) == 8, 20)
    finally:
        device.close()

    # A wrong password: a visible message, not an endless "Loading history…".
    sign_in(page, archive, "alice", password="wrong")
    expect(page.locator("#login-error")).to_contain_text("wrong user name or password")
    expect(page.locator("#app")).to_be_hidden()
    page.locator("#login-form input[name=password]").fill(PW["alice"])
    page.locator("#login-form button[type=submit]").click()
    signed_in(page, "alice")
    expect(page.locator("#conn")).to_have_attribute("data-state", "connected", timeout=10_000)

    # A cancelled scan is shown as cancelled, not as an abstained (red) call.
    cancelled_row = page.locator(f'#results tr[data-message-id="{cancelled["message_id"]}"]')
    expect(cancelled_row.locator("td.label")).to_have_text("cancelled")
    expect(cancelled_row.locator("td.label .badge")).to_have_class("badge risk-cancelled")
    expect(cancelled_row.locator("td.outcome .badge")).to_have_class("badge outcome-cancelled")
    background = "(s) => getComputedStyle(document.querySelector(s)).backgroundColor"
    red = page.evaluate(background, "#results .risk-high")
    assert page.evaluate(background, "#results .risk-cancelled") != red
    assert page.evaluate(background, "#results .outcome-cancelled") != red

    # Alerts: high risk first, three shown, the rest one tap away; no wall of banners.
    alerts = page.locator("#alerts li.alert")
    expect(alerts).to_have_count(3)
    expect(alerts.first).to_have_attribute("data-kind", "high_risk")
    expect(page.locator("#alert-count")).to_have_text("5")
    page.locator("#alerts-more").click()
    expect(alerts).to_have_count(5)
    gap_text = page.locator("li.alert-seq_gap").first.locator(".alert-text").inner_text()
    assert "not received" in gap_text and "scope-07" in gap_text, gap_text

    # The worklist: oldest first, the QC-sample slide marked as such.
    page.locator('#tabs button[data-view="worklist"]').click()
    work = page.locator("#worklist tbody tr")
    expect(work.first).to_be_visible(timeout=10_000)
    slides = [work.nth(i).locator("td.slide").inner_text() for i in range(work.count())]
    assert slides[:3] == ["S-0001", "S-0002", "S-0003"], slides
    qc = page.locator('#worklist tr[data-qc="true"]', has_text="S-0002")
    expect(qc.locator(".why")).to_have_text("QC sample")
    expect(page.locator("#results")).to_be_hidden()  # the overview table is another view

    # The QC-sample slide: no assigning for a cytotech (a pathologist's job, below).
    qc.click()
    expect(page.locator("#review #claim")).to_be_visible()
    expect(page.locator("#assign-form")).to_be_hidden()

    # Sign out S-0001 (claim first), then amend it: the history stays.
    work.filter(has_text="S-0001").click()
    review = page.locator("#review")
    expect(review.locator("#review-status")).to_have_attribute("data-state", "preliminary")
    assert report_status(archive, high["message_id"]) == "preliminary"
    review.locator("#claim").click()
    expect(review.locator("#review-note")).to_contain_text("Claimed")
    expect(work.filter(has_text="S-0001").locator("td.claimed")).to_have_text("alice")
    form = review.locator("#review-form")
    form.locator("select[name=bethesda]").select_option("HSIL")
    form.locator("textarea[name=comment]").fill("koilocytes <b>not markup</b>")
    form.locator("#review-submit").click()
    expect(review.locator("#review-note")).to_have_text("Signed out: HSIL.")
    expect(review.locator("#review-status")).to_have_attribute("data-state", "final")
    history = review.locator("#review-history li")
    expect(history).to_have_count(1)
    expect(history.first).to_contain_text("HSIL, satisfactory")
    expect(history.first).to_contain_text("signed out by alice (cytotech)")
    expect(history.first.locator("q")).to_have_text("koilocytes <b>not markup</b>")
    assert report_status(archive, high["message_id"]) == "final"
    expect(work.filter(has_text="S-0001")).to_have_count(0)  # signed out: off the worklist

    expect(form.locator("#review-submit")).to_have_text("Amend")
    form.locator("select[name=bethesda]").select_option("ASC-H")
    form.locator("#review-submit").click()
    expect(review.locator("#review-note")).to_have_text("Amended: ASC-H.")
    expect(review.locator("#review-status")).to_have_attribute("data-state", "amended")
    expect(history).to_have_count(2)
    expect(history.nth(0)).to_have_class("review superseded")
    expect(history.nth(1)).to_contain_text("ASC-H, satisfactory")
    expect(history.nth(1)).to_contain_text("amended by alice (cytotech)")
    assert report_status(archive, high["message_id"]) == "amended"
    reviews = api(archive, f"results/{high['message_id']}")["reviews"]
    assert [r["bethesda"] for r in reviews] == ["HSIL", "ASC-H"]

    # Acknowledge the slide's high-risk alert: it is gone, and stays gone after a reload.
    alert = page.locator("li.alert-high_risk", has_text="S-0001")
    alert.locator("button.ack").click()
    expect(alert).to_have_count(0)
    expect(page.locator("#alert-count")).to_have_text("4")
    page.reload()
    signed_in(page, "alice")
    expect(page.locator("#alert-count")).to_have_text("4")
    expect(page.locator("li.alert-high_risk")).to_have_count(0)
    acked = api(archive, "alerts?kind=high_risk")
    assert acked[0]["acked_by"] == "alice" and acked[0]["acked_at"]

    # Sign out of the dashboard: the session ends, the login form is back.
    page.locator("#logout").click()
    expect(page.locator("#login-form")).to_be_visible(timeout=10_000)
    me = "fetch('/api/me', {headers: {'X-Requested-With': 't'}}).then(r => r.status)"
    assert page.evaluate(me) == 401
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "dashboard-login.png"), full_page=True)


def test_crafted_link_sends_nothing_to_another_origin(
    broker: RunningBroker, archive: ArchiveService, page: Page, tmp_path: Path
) -> None:
    """Issue 20 against the archive-served page: ``?api=``/``?broker=`` name the attacker."""
    from test_deploy_dashboard import Listener

    attacker = Listener()
    try:
        evil = f"127.0.0.1:{attacker.port}"
        sign_in(page, archive, "operator", remember=True)  # the broker password is remembered
        signed_in(page, "operator")
        query = f"api=http://{evil}/api&broker=ws://{evil}/mqtt&url=ws://{evil}/mqtt"
        page.goto(f"{archive.http_url}index.html?{query}&username=operator&password=x")
        signed_in(page, "operator")  # still the own archive's session
        conn = page.locator("#conn")
        expect(conn).to_have_attribute("data-state", "connected", timeout=10_000)
        expect(conn).to_contain_text(f"wss://localhost:{broker.tree.dashboard_port}/mqtt")
        page.locator("#filters button[type=submit]").click()
        page.wait_for_load_state("networkidle")
        assert attacker.received == [], f"sent to {evil}: {attacker.received!r}"
    finally:
        attacker.close()


def test_pathologist_assigns_a_worklist_slide(
    broker: RunningBroker, archive: ArchiveService, page: Page
) -> None:
    device = device_peer(broker)
    try:
        unsure = result(1, "S-0009", 0.5, outcome="abstained", reason="uncertain_probability")
        assert device.publish_ok(f"{PREFIX}/scope-07/result", json.dumps(unsure))
        assert wait_until(lambda: stored(archive) == 1, 20)
    finally:
        device.close()
    sign_in(page, archive, "bob")
    signed_in(page, "bob")
    page.locator('#tabs button[data-view="worklist"]').click()
    row = page.locator("#worklist tbody tr", has_text="S-0009")
    row.click()
    assign = page.locator("#assign-form")
    assign.locator("input[name=user]").fill("alice")
    assign.locator("button[type=submit]").click()
    expect(page.locator("#review-note")).to_have_text("Assigned to alice.")
    expect(row.locator("td.claimed")).to_have_text("alice")
    assign.locator("input[name=user]").fill("dashboard")  # a viewer cannot hold a slide
    assign.locator("button[type=submit]").click()
    expect(page.locator("#review-note")).to_contain_text("Assigning failed: 4")
    expect(row.locator("td.claimed")).to_have_text("alice")


# The first worklist request after this is answered 1.5 s late (the data it carries are those
# of when it was asked); window.__staleLanded is set once it has been handed to the page.
SLOW_FIRST_WORKLIST = """() => {
  const proto = window.Omis.Archive.prototype;
  const original = proto.worklist;
  let calls = 0;
  proto.worklist = function (...args) {
    calls += 1;
    const answer = original.apply(this, args);
    if (calls !== 1) return answer;
    return answer.then((v) => new Promise((done) => setTimeout(() => {
      done(v);
      setTimeout(() => { window.__staleLanded = true; }, 0);
    }, 1500)));
  };
}"""


def test_a_late_worklist_answer_does_not_undo_a_claim(
    broker: RunningBroker, archive: ArchiveService, page: Page
) -> None:
    """Two worklist loads whose answers cross (a periodic refresh asked before a claim, answered
    after the claim's own reload): the older answer must not repaint the row as unclaimed."""
    device = device_peer(broker)
    try:
        unsure = result(1, "S-0011", 0.5, outcome="abstained", reason="uncertain_probability")
        assert device.publish_ok(f"{PREFIX}/scope-07/result", json.dumps(unsure))
        assert wait_until(lambda: stored(archive) == 1, 20)
    finally:
        device.close()
    sign_in(page, archive, "alice")
    signed_in(page, "alice")
    page.locator('#tabs button[data-view="worklist"]').click()
    row = page.locator("#worklist tbody tr", has_text="S-0011")
    row.click()
    expect(row.locator("td.claimed")).to_have_text("–")
    page.evaluate(SLOW_FIRST_WORKLIST)
    page.locator("#worklist-filters button[type=submit]").click()  # asked now, answered late
    page.locator("#review #claim").click()
    expect(page.locator("#review-note")).to_contain_text("Claimed")
    expect(row.locator("td.claimed")).to_have_text("alice")
    page.wait_for_function("() => window.__staleLanded === true", timeout=10_000)
    expect(row.locator("td.claimed")).to_have_text("alice")
