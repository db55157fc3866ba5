"""The fleet page (deploy/dashboard/fleet.html) in real headless Chromium.

Served by a real :class:`ArchiveService` (SQLite, a real mosquitto) whose rows are written
through the archive's own APIs: :class:`ArchiveStore` (availability, ``ota/state``, results),
:class:`ShadowArchive` (shadow results) and :class:`FleetStore` (groups, a halted rollout).
The page must list each device's versions, OTA step, outcome and rollbacks, the rollout's
reason and per-device steps, the shadow comparison of a device's candidate, refresh on its own,
and show hostile values as text (conftest's ``page`` fails on any JavaScript error or CSP
violation).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from broker_support import Mosquitto, mosquitto_fixture  # noqa: F401
from collector_support import make_result
from playwright.sync_api import Page, expect
from test_shadow_archive import CANDIDATE, shadow_for

from deploy.broker import find_mosquitto, free_port
from deploy.collector.config import load_collector_config
from deploy.collector.db import migrate, open_engine
from deploy.collector.service import ArchiveService
from deploy.collector.shadow import ShadowArchive
from deploy.collector.store import ArchiveStore
from deploy.fleet.store import BundleRef, FleetStore, plan_waves

pytestmark = pytest.mark.skipif(find_mosquitto() is None, reason="mosquitto is not installed")

HOSTILE = '<img src=x onerror="window.__pwned=1">'


def _state(current: Any, **extra: Any) -> dict[str, Any]:
    return {
        "schema": "omis.ota_state/1",
        "current": current,
        "previous": 3,
        "pending": None,
        "last_outcome": {"result": "committed", "version": current},
        "progress": None,
        **extra,
    }


def _fill(url: str) -> tuple[FleetStore, int]:
    engine = open_engine(url)
    migrate(engine)
    store = ArchiveStore(engine)
    for device in ("scope-07", "scope-08", "scope-09"):
        store.set_availability(device, "online")
    store.set_availability("scope-08", "offline")
    # scope-07 serves v4 and holds candidate v5 in shadow; three slides compared
    shadow = {"name": CANDIDATE.name, "version": 5, "sha256": CANDIDATE.sha256}
    store.set_ota_state("scope-07", _state(4, shadow=shadow))
    served = [make_result(i, p_high=0.2) for i in (1, 2, 3)]
    archive = ShadowArchive(engine)
    for result, call in zip(served, ["low", "high", "low"], strict=True):
        store.add_result(result)
        assert archive.add("scope-07", json.dumps(shadow_for(result, call)).encode())
    # scope-08 rolled v5 back
    rolled = {"step": "rolled_back", "correlation_id": "c8", "version": 5, "reason": "NaN"}
    store.set_ota_state(
        "scope-08",
        _state(4, last_outcome={"result": "rolled_back", "version": 5}, progress=rolled),
    )
    # scope-09 reports nonsense of every type, HTML included
    store.set_ota_state(
        "scope-09",
        {
            "current": HOSTILE,
            "previous": {"x": 1},
            "pending": [1, 2],
            "shadow": {"name": HOSTILE, "version": "five", "sha256": 12},
            "last_outcome": HOSTILE,
            "progress": {"step": ["a"], "correlation_id": 5},
        },
    )
    fleet = FleetStore(engine)
    fleet.add_to_group("ward-3", ["scope-07", "scope-08"])
    waves = plan_waves(["scope-07", "scope-08", "scope-09"], 1, 1)
    bundle = BundleRef("cd" * 32, HOSTILE, 5)
    record, _ = fleet.begin_rollout(bundle, {"group": "ward-3"}, waves, 1, 1)
    fleet.set_step(record.id, "scope-07", "committed", version=5)
    fleet.set_step(record.id, "scope-08", "rolled_back", version=4, detail="NaN in output")
    fleet.finish(record.id, "halted", f"scope-08 rolled back: {HOSTILE}")
    engine.dispose()
    return FleetStore(open_engine(url)), record.id


@pytest.fixture
def fleet_site(mosquitto: Mosquitto, tmp_path: Path) -> Iterator[tuple[str, FleetStore]]:
    url = f"sqlite:///{tmp_path / 'archive.sqlite'}"
    fleet, _ = _fill(url)
    config = load_collector_config(
        environ={},
        overrides={
            "database": {"url": url},
            "mqtt": {"broker": mosquitto.url, "client_id": "archive-fleet-page"},
            "http": {"port": free_port()},
        },
    )
    service = ArchiveService(config, tmp_path / "state")
    stop = threading.Event()
    service.start()
    runner = threading.Thread(target=service.run, args=(stop,))
    runner.start()
    try:
        yield service.http_url.rstrip("/"), fleet
    finally:
        stop.set()
        runner.join(10)
        service.close()
        fleet.engine.dispose()


def _row(page: Page, device: str) -> Any:
    return page.locator("#fleet-devices tbody tr", has_text=device)


def test_fleet_page_lists_devices_rollouts_and_shadow(
    fleet_site: tuple[str, FleetStore], page: Page
) -> None:
    site, fleet = fleet_site
    response = page.goto(f"{site}/fleet.html?refresh=1")
    assert response is not None and response.ok
    assert "script-src 'self'" in response.headers["content-security-policy"]
    expect(page.locator("#fleet-devices tbody tr")).to_have_count(3)
    cells = _row(page, "scope-07").locator("td")
    expect(cells.nth(1)).to_have_text("ward-3")
    expect(cells.nth(2)).to_have_text("v4")
    expect(cells.nth(3)).to_contain_text("cand v5")
    expect(cells.nth(5)).to_contain_text("committed v4")
    expect(cells.nth(7)).to_have_text("online")
    eight = _row(page, "scope-08").locator("td")
    expect(eight.nth(4)).to_contain_text("rolled_back")
    expect(eight.nth(5)).to_contain_text("rolled_back v5")
    expect(eight.nth(6)).to_have_text("1")
    expect(eight.nth(7)).to_have_text("offline")
    # the shadow candidate's comparison: 2 of 3 calls agree, the candidate refers 1 of 3
    summary = page.locator("#fleet-shadow li", has_text="scope-07")
    expect(summary).to_contain_text("agreement 66.7 % (2/3)")
    expect(summary).to_contain_text("referral 33.3 % (1/3) vs serving 0.0 % (0/3)")
    link = summary.locator("a")
    expect(link).to_have_attribute(
        "href", f"api/shadow?candidate={CANDIDATE.sha256}&device=scope-07"
    )
    # the halted rollout: reason, bundle, per-wave steps with a progress count
    rollout = page.locator("#fleet-rollouts > li").first
    expect(rollout).to_contain_text("halted")
    expect(rollout).to_contain_text(f"scope-08 rolled back: {HOSTILE}")
    expect(rollout).to_contain_text(f"{HOSTILE} v5")
    expect(rollout).to_contain_text("1/3 committed")
    waves = rollout.locator(".waves > li")
    expect(waves).to_have_count(3)
    expect(waves.nth(0)).to_contain_text("canary")
    expect(waves.nth(0)).to_contain_text("scope-07: committed v5")
    expect(waves.nth(1)).to_contain_text("scope-08: rolled_back v4 (NaN in output)")
    expect(waves.nth(2)).to_contain_text("scope-09: pending")
    # hostile values are text: nothing injected, nothing thrown
    nine = _row(page, "scope-09").locator("td")
    expect(nine.nth(2)).to_have_text("–")
    expect(nine.nth(5)).to_have_text("–")
    assert page.locator("#fleet-devices img, #fleet-rollouts img").count() == 0
    assert page.evaluate("window.__pwned") is None
    # it refreshes on its own: a step recorded now appears without a reload
    rid = fleet.rollouts(1)[0].id
    fleet.set_step(rid, "scope-09", "committed", version=5)
    expect(waves.nth(2)).to_contain_text("scope-09: committed v5", timeout=5000)
    expect(rollout).to_contain_text("2/3 committed")
