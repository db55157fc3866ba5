"""``omis demo --dashboard`` is live: the page connects and shows what the archive knows.

The demo's own services (:func:`deploy.demo.demo_services`: the embedded mosquitto, now with a
WebSockets listener, and the embedded archive serving the page) run for real; a paho client
plays the demo device.  Before the fix the page tried ``ws://<host>:8884`` (nothing listens
there) and its card said "unknown / no status" although the archive held the device's state.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import httpx
from broker_support import publish, wait_until
from playwright.sync_api import Page, expect
from rich.console import Console
from test_deploy_dashboard import result_payload, status_payload

from deploy.demo import DEVICE_ID, PREFIX, demo_services


def test_demo_dashboard_is_live_and_shows_the_archived_state(tmp_path: Path, page: Page) -> None:
    quiet = Console(file=open(tmp_path / "console.txt", "w"))  # noqa: SIM115 - closed below
    try:
        with demo_services(tmp_path / "archive", True, quiet) as (port, archive):
            topic = f"{PREFIX}/{DEVICE_ID}"
            # Not retained: only the archive knows this status once the page opens.
            status = {**status_payload("idle"), "device_id": DEVICE_ID}
            publish(port, f"{topic}/status", json.dumps(status))
            body = {**result_payload(1, "DEMO-1", 0.2), "device_id": DEVICE_ID}
            body["message_id"] = str(uuid.uuid4())
            publish(port, f"{topic}/result", json.dumps(body))
            api = f"{archive.service.http_url}api/devices"

            def archived() -> bool:
                known = httpx.get(api, timeout=5).json()
                return bool(known) and known[0]["status"] is not None and known[0]["results"] == 1

            assert wait_until(archived, 15)

            page.goto(archive.url)  # as printed by the demo; nothing typed into any form
            conn = page.locator("#conn")
            expect(conn).to_have_attribute("data-state", "connected", timeout=10_000)
            card = page.locator(f'article.device[data-device="{DEVICE_ID}"]')
            expect(card.locator(".state")).to_have_text("idle", timeout=10_000)
            expect(card.locator(".fact-archived dd")).to_have_text("1 result(s)")
            expect(page.locator("#results tbody tr")).to_have_count(1)
            expect(page.locator("#settings")).to_be_hidden()

            # Live: the next result arrives over the WebSockets listener, the counters follow.
            second = {**result_payload(2, "DEMO-2", 0.9), "device_id": DEVICE_ID}
            publish(port, f"{topic}/result", json.dumps(second))
            expect(page.locator("#results tbody tr")).to_have_count(2, timeout=10_000)
            expect(page.locator("#history-note")).to_contain_text("2 archived result(s)")
            expect(card.locator(".fact-archived dd")).to_have_text("2 result(s)")
    finally:
        quiet.file.close()
