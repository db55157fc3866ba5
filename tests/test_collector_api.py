"""The collector's HTTP API: filters, paging, CSV, FHIR (validated by fhir.resources), auth."""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator
from typing import Any

import pytest
from collector_support import database_url, make_result, postgres_server  # noqa: F401
from fastapi.testclient import TestClient
from fhir.resources.R4B.bundle import Bundle
from fhir.resources.R4B.diagnosticreport import DiagnosticReport

from deploy.collector.api import create_app
from deploy.collector.auth import hash_password, verify_password
from deploy.collector.config import Account, HttpConfig
from deploy.collector.db import migrate, open_engine
from deploy.collector.queries import ArchiveQueries
from deploy.collector.store import ArchiveStore

PASSWORD = "correct horse"


@pytest.fixture
def stored(db_url: str) -> Iterator[dict[str, dict[str, Any]]]:
    engine = open_engine(db_url)
    migrate(engine)
    store = ArchiveStore(engine)
    rows = {
        "high": make_result(1, slide="S-2041", p_high=0.91, finished_at="2026-01-01T12:00:01.000Z"),
        "low": make_result(2, slide="S-2042", p_high=0.08, finished_at="2026-01-01T12:00:02.000Z"),
        "unsure": make_result(
            3, slide="S-3001", p_high=0.55, abstained=True, finished_at="2026-01-01T12:00:03.000Z"
        ),
        "failed": make_result(
            4,
            slide="S-3002",
            finished_at="2026-01-01T12:00:04.000Z",
            device="scope-08",
            outcome="failed",
            stage="acquire",
            reason="focus lost",
        ),
    }
    for row in rows.values():
        store.add_result(row)
    yield rows
    engine.dispose()


def client(db_url: str, **http: Any) -> TestClient:
    engine = open_engine(db_url, writer=False)
    accounts = [
        Account(name="lab", role="viewer", password_hash=hash_password(PASSWORD)),
        Account(name="op", role="operator", password_hash=hash_password(PASSWORD)),
    ]
    config = HttpConfig(accounts=accounts, **http)
    # TestClient's peer is "testclient", i.e. not localhost: every request must authenticate
    api = TestClient(create_app(ArchiveQueries(engine), config, None))
    api.auth = ("lab", PASSWORD)
    return api


def test_results_filters_and_paging(stored: dict[str, Any], db_url: str) -> None:
    api = client(db_url)
    body = api.get("/api/results", params={"limit": 2}).json()
    assert body["total"] == 4
    assert [r["slide_id"] for r in body["items"]] == ["S-3002", "S-3001"]
    page2 = api.get("/api/results", params={"limit": 2, "offset": 2}).json()["items"]
    assert [r["slide_id"] for r in page2] == ["S-2042", "S-2041"]
    assert page2[1]["p_high"] == 0.91
    review = api.get("/api/results", params={"review": "true"}).json()["items"]
    assert {(r["outcome"], r["outcome_reason"]) for r in review} == {
        ("failed", "focus lost"),
        ("abstained", "p(high) inside the abstain band"),
    }
    assert api.get("/api/results", params={"risk": "high"}).json()["total"] == 2  # + abstained
    assert api.get("/api/results", params={"risk": "high", "review": False}).json()["total"] == 1
    assert api.get("/api/results", params={"device": "scope-08"}).json()["total"] == 1
    assert api.get("/api/results", params={"slide": "s-30"}).json()["total"] == 2
    window = {"since": "2026-01-01T12:00:02Z", "until": "2026-01-01T13:00:04+01:00"}
    assert api.get("/api/results", params=window).json()["total"] == 2
    bad = api.get("/api/results", params={"since": "yesterday"})
    assert bad.status_code == 400
    assert "since" in bad.json()["detail"]
    assert api.get("/api/results", params={"outcome": "exploded"}).status_code == 422


def test_one_result_csv_and_openapi(stored: dict[str, Any], db_url: str) -> None:
    api = client(db_url)
    unsure = stored["unsure"]
    full = api.get(f"/api/results/{unsure['message_id']}").json()
    assert full["result"] == unsure  # the payload as received: spectrum, per-field QC
    assert full["archive"]["outcome"] == "abstained"
    assert api.get("/api/results/nope").status_code == 404
    response = api.get("/api/results.csv", params={"review": "false"})
    assert response.headers["content-type"].startswith("text/csv")
    assert "attachment" in response.headers["content-disposition"]
    rows = list(csv.DictReader(io.StringIO(response.text)))
    assert [r["slide_id"] for r in rows] == ["S-2042", "S-2041"]
    assert rows[1]["p_high"] == "0.91"
    schema = api.get("/api/openapi.json").json()
    assert {"/api/results", "/api/results.csv", "/api/alerts", "/api/devices"} <= set(
        schema["paths"]
    )
    assert "/api/results/{message_id}/fhir" in schema["paths"]


@pytest.mark.parametrize("kind", ["high", "unsure", "failed"])
def test_fhir_bundle_is_valid_r4(stored: dict[str, Any], db_url: str, kind: str) -> None:
    api = client(db_url)
    result = stored[kind]
    response = api.get(f"/api/results/{result['message_id']}/fhir")
    assert response.headers["content-type"] == "application/fhir+json"
    bundle = Bundle.model_validate(response.json())  # raises on anything invalid
    resources = {e.resource.get_resource_type(): e.resource for e in bundle.entry}
    report = resources["DiagnosticReport"]
    assert isinstance(report, DiagnosticReport)
    # nothing is signed out yet: the device's call is preliminary; a failed scan is cancelled
    status = {"high": "preliminary", "unsure": "preliminary", "failed": "cancelled"}[kind]
    assert report.status == status
    call = resources["Observation"]
    assert call.code.coding[0].code == "device-call"
    value = call.valueCodeableConcept.coding[0].code
    assert value == {"high": "high", "unsure": "abstained", "failed": "failed"}[kind]
    if kind == "high":
        assert float(call.component[0].valueQuantity.value) == 0.91
        assert "high risk, p(high) 0.91" in report.conclusion
    if kind == "failed":
        assert "scan failed at stage acquire" in report.conclusion
    models = [
        e.resource
        for e in bundle.entry
        if e.resource.get_resource_type() == "Device" and e.resource.version
    ]
    assert models[0].version[0].value == "4"
    assert models[0].identifier[0].value == "cd" * 32
    refs = {e.fullUrl for e in bundle.entry}
    assert {r.reference for r in report.result} <= refs


def test_remote_requests_need_an_account(stored: dict[str, Any], db_url: str) -> None:
    api = client(db_url)
    assert api.get("/api/me").json() == {"name": "lab", "role": "viewer", "via": "basic"}
    assert api.get("/api/me", auth=("op", PASSWORD)).json()["role"] == "operator"
    for auth in (("lab", "wrong"), ("nobody", PASSWORD)):
        response = api.get("/api/results", auth=auth)
        assert response.status_code == 401
        assert response.headers["www-authenticate"] == "Basic"
    anonymous = TestClient(api.app)
    assert anonymous.get("/api/results").status_code == 401
    assert verify_password(PASSWORD, hash_password(PASSWORD))
    assert not verify_password(PASSWORD, "plain-text")
