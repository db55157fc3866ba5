"""The lab's loop against real parts: mosquitto, an ``omis collect`` process, the CLI.

Results arrive over MQTT: 50 single-message boots cannot push a high-risk alert off the
alert list, a reused seq number raises an alert, and a cytotech added with ``omis collect user
add`` logs in (UTF-8 password), acknowledges the alert with the session's CSRF token and signs
the slide out; the FHIR export turns final.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import httpx
from broker_support import Mosquitto, mosquitto_fixture, publish, wait_until  # noqa: F401
from collector_support import ROOT, collector_child, make_result

from deploy.broker import free_port

PASSWORD = "Grüße, 東京 ☂"


def _cli(*argv: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}
    return subprocess.run(
        [sys.executable, "-m", "deploy.cli", *argv],
        input=stdin, capture_output=True, text=True, timeout=60, env=env, check=False,
    )  # fmt: skip


def test_alerts_and_sign_out_through_a_real_broker_and_collector(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    db = f"sqlite:///{tmp_path / 'archive.sqlite'}"
    added = _cli("collect", "user", "add", "cyd", "--role", "cytotech", "--db", db, stdin=PASSWORD)
    assert added.returncode == 0, added.stderr
    refused = _cli("collect", "user", "add", "eve", "--role", "root", "--db", db, stdin="x")
    assert refused.returncode != 0 and "role 'root'" in refused.stderr.splitlines()[-1]
    port = free_port()
    child = collector_child(mosquitto.url, db, "archive-live", tmp_path / "state", port)
    try:
        api = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10)

        def up() -> bool:
            try:
                return api.get("/api/alerts").status_code == 200
            except httpx.TransportError:
                return False

        assert wait_until(up, 30), child.poll()
        assert wait_until(
            lambda: "Received SUBSCRIBE from archive-live" in mosquitto.log_text(), 30
        )
        high = make_result(1, boot="boot-main", slide="S-HIGH", p_high=0.934)
        publish(mosquitto.port, "omis/v1/scope-07/result", json.dumps(high))
        for i in range(50):
            lone = make_result(4, boot=f"boot-{i}", slide=f"L-{i}")
            publish(mosquitto.port, "omis/v1/scope-07/result", json.dumps(lone))
        again = make_result(1, boot="boot-main", slide="S-OTHER")
        publish(mosquitto.port, "omis/v1/scope-07/result", json.dumps(again))
        assert wait_until(lambda: api.get("/api/results").json()["total"] == 52, 60)

        page = api.get("/api/alerts", params={"limit": 50}).json()
        high_alerts = [a for a in page if a["kind"] == "high_risk"]
        assert [a["slide_id"] for a in high_alerts] == ["S-HIGH"]
        assert high_alerts[0]["detail"].startswith(
            "Slide S-HIGH on scope-07: high risk, p(high) 0.93"
        )
        reused = api.get("/api/alerts", params={"kind": "seq_reused"}).json()
        assert len(reused) == 1 and "S-HIGH, S-OTHER" in reused[0]["detail"]

        login = api.post("/api/login", json={"name": "cyd", "password": PASSWORD})
        assert login.status_code == 200, login.text
        assert "httponly" in login.headers["set-cookie"].lower()
        assert "samesite=strict" in login.headers["set-cookie"].lower()
        csrf = {"X-CSRF-Token": login.json()["csrf_token"]}
        ack = api.post(f"/api/alerts/{high_alerts[0]['id']}/ack", json={}, headers=csrf)
        assert ack.status_code == 200 and ack.json()["acked_by"] == "cyd"
        mid = high["message_id"]
        review = {"bethesda": "HSIL", "adequacy": "satisfactory"}
        assert api.post(f"/api/results/{mid}/review", json=review).status_code == 403
        signed = api.post(f"/api/results/{mid}/review", json=review, headers=csrf)
        assert signed.status_code == 201, signed.text
        fhir = api.get(f"/api/results/{mid}/fhir").json()
        report = fhir["entry"][0]["resource"]
        assert report["resourceType"] == "DiagnosticReport" and report["status"] == "final"
        assert api.post("/api/logout", headers=csrf).status_code == 204
        assert api.get("/api/me").json()["via"] == "local"  # the session is gone
    finally:
        child.terminate()
        child.wait(15)
