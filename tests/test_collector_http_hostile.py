"""The archive's HTTP edge against a hostile lab network (issue 20): query parameters, CSV
formula injection, security headers, allowed hosts, docs behind login, ordering by bounded
device clocks.  SQLite and a real PostgreSQL."""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator
from datetime import timedelta
from typing import Any
from urllib.parse import quote

import pytest
from collector_support import database_url, make_result, postgres_server  # noqa: F401
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, inspect

from deploy.collector.api import create_app
from deploy.collector.auth import hash_password
from deploy.collector.config import Account, HttpConfig
from deploy.collector.db import migrate, open_engine
from deploy.collector.queries import ArchiveQueries, ResultFilter
from deploy.collector.store import ArchiveStore, result_row, utcnow

PASSWORD = "correct horse"
BROKER_WS = "wss://broker.lab.example:8884/mqtt"


@pytest.fixture
def store(db_url: str) -> Iterator[ArchiveStore]:
    engine = open_engine(db_url)
    migrate(engine)
    store = ArchiveStore(engine)
    for seq in range(1, 4):
        store.add_result(make_result(seq, finished_at=f"2026-01-01T12:00:0{seq}.000Z"))
    yield store
    engine.dispose()


def client(db_url: str, *, auth: bool = True, **http: Any) -> TestClient:
    engine = open_engine(db_url, writer=False)
    accounts = [Account(name="lab", role="viewer", password_hash=hash_password(PASSWORD))]
    http.setdefault("allowed_hosts", ["testserver", "localhost", "[::1]"])
    http.setdefault("dashboard_broker_url", BROKER_WS)
    config = HttpConfig(accounts=accounts, **http)
    api = TestClient(create_app(ArchiveQueries(engine), config, None))
    if auth:
        api.auth = ("lab", PASSWORD)
    return api


HUGE = "x" * 60_000  # over SQLite's 50,000-byte LIKE pattern limit; httpx sends at most 64 Ki
# (endpoint, parameter, hostile value): each must be one 422 naming the parameter.
HOSTILE_QUERIES = [
    ("/api/results", "offset", str(2**63)),
    ("/api/results", "offset", "-1"),
    ("/api/results", "limit", str(2**63)),
    ("/api/results", "limit", "0"),
    ("/api/results", "since", "0001-01-01T00:00:00+01:00"),  # overflows when made UTC
    ("/api/results", "until", "9999-12-31T23:59:59-01:00"),
    ("/api/results", "since", "2026-01-01T00:00:00\x00Z"),
    ("/api/results", "since", "yesterday"),
    ("/api/results", "until", "2026-01-01T00:00:00"),  # no zone
    ("/api/results", "since", HUGE),
    ("/api/results", "slide", "\x00"),
    ("/api/results", "slide", HUGE),
    ("/api/results", "device", "scope\x0007"),
    ("/api/results", "device", HUGE),
    ("/api/results", "outcome", "exploded"),
    ("/api/results", "risk", "\x00"),
    ("/api/results", "review", "maybe"),
    ("/api/results.csv", "slide", "\x00"),
    ("/api/results.csv", "since", "0001-01-01T00:00:00+01:00"),
    ("/api/results.csv", "device", HUGE),
    ("/api/alerts", "limit", str(2**63)),
    ("/api/alerts", "device", "\x00"),
    ("/api/alerts", "device", HUGE),
    ("/api/alerts", "open", "perhaps"),
]


def test_every_hostile_query_parameter_is_one_422_naming_it(
    store: ArchiveStore, db_url: str
) -> None:
    api = client(db_url)
    for path, name, value in HOSTILE_QUERIES:
        response = api.get(path, params={name: value})
        assert response.status_code == 422, (path, name, value[:20], response.text[:200])
        named = [e["loc"] for e in response.json()["detail"]]
        assert named == [["query", name]], (path, name, named)
    assert api.get("/api/results", params={"slide": "S-000"}).json()["total"] == 3


def _bounded(schema: dict[str, Any]) -> bool:
    options = [o for o in schema.get("anyOf", [schema]) if o.get("type") != "null"]
    for option in options:
        kind = option.get("type")
        if "enum" in option or kind == "boolean":
            continue
        if kind == "integer" and {"minimum", "maximum"} <= option.keys():
            continue
        if (
            kind == "string"
            and "maxLength" in option
            and ("pattern" in option or "format" in option)
        ):
            continue
        if "maxLength" in schema and ("pattern" in schema or "format" in schema):
            continue  # FastAPI puts a nullable parameter's constraints beside anyOf
        return False
    return True


def test_every_parameter_in_the_document_is_bounded() -> None:
    """The class, not the examples: every query and path parameter of every operation (also
    those added later) declares its bounds, which FastAPI enforces before the handler runs."""
    app = create_app(ArchiveQueries(create_engine("sqlite://")), HttpConfig(), None)
    document = app.openapi()
    unbounded = [
        (path, parameter["name"], parameter["schema"])
        for path, operations in document["paths"].items()
        for operation in operations.values()
        for parameter in operation.get("parameters", [])
        if parameter["in"] in ("query", "path") and not _bounded(parameter["schema"])
    ]
    assert unbounded == []


def test_hostile_path_identifiers_are_422(store: ArchiveStore, db_url: str) -> None:
    api = client(db_url)
    for message_id in ("a\x00b", HUGE, "\x1b[31m", "a\nb"):
        for suffix in ("", "/fhir"):
            response = api.get(f"/api/results/{quote(message_id)}{suffix}")
            assert response.status_code == 422, response.text[:200]
            assert response.json()["detail"][0]["loc"] == ["path", "message_id"]


FORMULA_PREFIXES = ["=", "+", "-", "@", "\t", "\r"]
TEXT_COLUMNS = [
    "message_id", "device_id", "boot_id", "slide_id", "scan_id", "outcome_reason",
    "outcome_stage", "label", "risk", "model_name", "model_sha256",
]  # fmt: skip


def test_csv_export_neutralises_formulas_in_every_text_column(
    store: ArchiveStore, db_url: str
) -> None:
    rows, expected = [], {}
    for n, prefix in enumerate(FORMULA_PREFIXES):
        row = result_row(make_result(10 + n, p_high=0.9), utcnow())
        hostile = {name: f"{prefix}HYPERLINK({i})" for i, name in enumerate(TEXT_COLUMNS)}
        hostile["message_id"] = f"{prefix}{n}"  # unique
        row.update(hostile, seq=-n - 1, model_version=-7, p_high=-0.25)  # numbers stay numbers
        rows.append(row)
        expected[str(-n - 1)] = hostile
    store.insert_many(rows)
    text = client(db_url).get("/api/results.csv").text
    exported = {r["seq"]: r for r in csv.DictReader(io.StringIO(text, newline=""))}
    for seq, hostile in expected.items():
        for name, value in hostile.items():
            assert exported[seq][name] == "'" + value, (repr(value), name)
        assert (exported[seq]["model_version"], exported[seq]["p_high"]) == ("-7", "-0.25")
    assert exported["1"]["slide_id"] == "S-0001"  # ordinary text is untouched


def test_every_response_carries_the_security_headers(store: ArchiveStore, db_url: str) -> None:
    api = client(db_url)
    responses = [
        api.get("/api/results"),
        api.get("/api/results.csv"),
        api.get("/api/results/nope"),  # 404
        api.get("/api/results", params={"limit": "0"}),  # 422
        api.get("/api/results", auth=("lab", "wrong")),  # 401
        api.get("/api/docs"),
        api.get("/api/openapi.json"),
    ]
    for response in responses:
        headers = response.headers
        csp = headers["content-security-policy"]
        directives = dict(d.strip().split(" ", 1) for d in csp.split(";") if d.strip())
        assert directives["default-src"] == "'self'"
        assert directives["frame-ancestors"] == "'none'"
        assert "unsafe-inline" not in directives.get("script-src", directives["default-src"])
        assert headers["x-frame-options"] == "DENY"
        assert headers["x-content-type-options"] == "nosniff"
        assert headers["referrer-policy"] == "no-referrer"
    page_csp = responses[0].headers["content-security-policy"]
    assert BROKER_WS in page_csp.split("connect-src", 1)[1].split(";")[0]


def test_without_a_configured_broker_the_csp_allows_the_pages_host_on_8884(
    store: ArchiveStore, db_url: str
) -> None:
    api = client(db_url, dashboard_broker_url=None)
    for host, expected in (("localhost:8080", "localhost"), ("[::1]:8080", "[::1]")):
        csp = api.get("/api/me", headers={"Host": host}).headers["content-security-policy"]
        connect = csp.split("connect-src", 1)[1].split(";")[0].split()
        assert connect == ["'self'", f"ws://{expected}:8884", f"wss://{expected}:8884"], csp


def test_unknown_host_headers_are_refused(store: ArchiveStore, db_url: str) -> None:
    api = client(db_url, allowed_hosts=["archive.lab.example", "localhost"])
    for host in ("evil.example", "archive.lab.example.evil.example", "127.0.0.2"):
        response = api.get("/api/results", headers={"Host": host})
        assert response.status_code == 400, host
    assert api.get("/api/results", headers={"Host": "archive.lab.example"}).status_code == 200
    assert api.get("/api/results", headers={"Host": "localhost:8080"}).status_code == 200


def test_default_allowed_hosts_are_the_local_names() -> None:
    assert {"localhost", "127.0.0.1", "[::1]"} <= set(HttpConfig().allowed_hosts)
    assert "*" not in HttpConfig().allowed_hosts


def test_docs_and_openapi_need_a_login_when_auth_is_on(store: ArchiveStore, db_url: str) -> None:
    anonymous = client(db_url, auth=False)
    for path in ("/api/docs", "/api/openapi.json"):
        assert anonymous.get(path).status_code == 401, path
    api = client(db_url)
    assert api.get("/api/openapi.json").json()["paths"]
    docs = api.get("/api/docs")
    assert docs.status_code == 200
    assert "swagger" in docs.text.lower()


def test_a_device_clock_in_the_future_does_not_stay_on_top(
    store: ArchiveStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    queries = ArchiveQueries(store.engine)
    now = utcnow()
    store.add_result(make_result(7, slide="S-FUTURE", finished_at="8999-12-31T23:59:59.000Z"))
    later = now + timedelta(hours=1)  # an hour later on the archive's clock, an honest result
    monkeypatch.setattr("deploy.collector.store.utcnow", lambda: later)
    finished = (later - timedelta(seconds=1)).isoformat() + "Z"
    store.add_result(make_result(8, slide="S-HONEST", finished_at=finished))
    for items in (
        queries.list_results(ResultFilter(), 10)[1],
        list(queries.iter_results(ResultFilter())),
    ):
        assert [r["slide_id"] for r in items][:2] == ["S-HONEST", "S-FUTURE"]
        future = items[1]
        assert future["device_clock_ahead"] is True
        assert future["finished_at"].startswith("8999-12-31")  # what the device said stays
        assert items[0]["device_clock_ahead"] is False


def test_status_from_a_clock_once_in_the_future_does_not_stick(
    store: ArchiveStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    queries = ArchiveQueries(store.engine)
    now = utcnow()
    store.set_status("scope-07", {"state": "scanning", "at": "9999-01-01T00:00:00.000Z"})
    # the future status counts as "now + the allowed skew"; once that has passed on the
    # archive's clock, an honest status wins again
    later = now + timedelta(minutes=30)
    monkeypatch.setattr("deploy.collector.store.utcnow", lambda: later)
    store.set_status("scope-07", {"state": "idle", "at": later.isoformat() + "Z"})
    assert queries.devices()[0]["status"]["state"] == "idle"


def test_status_times_compare_as_instants_not_text(store: ArchiveStore) -> None:
    queries = ArchiveQueries(store.engine)
    store.set_status("scope-07", {"state": "scanning", "at": "2026-01-01T12:30:00Z"})
    # 13:00+01:00 is 12:00Z: older, although it sorts after as text
    store.set_status("scope-07", {"state": "idle", "at": "2026-01-01T13:00:00+01:00"})
    assert queries.devices()[0]["status"]["state"] == "scanning"


def test_upgrade_from_0001_bounds_the_rows_already_stored(db_url: str) -> None:
    from alembic import command
    from alembic.config import Config as AlembicConfig
    from sqlalchemy import column, insert, select, table

    from deploy.collector.db import MIGRATIONS
    from deploy.collector.tables import results

    engine = open_engine(db_url)
    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    received = utcnow()
    rows = []
    for seq, finished in ((1, "8999-01-01T00:00:00Z"), (2, "2026-01-01T00:00:00Z")):
        rows.append(result_row(make_result(seq, finished_at=finished), received))
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "0001")
        # only the columns release 0001 has (later revisions add sort_at, qc_rank, ...)
        present = {c["name"] for c in inspect(conn).get_columns("results")}
        assert "sort_at" not in present
        rows = [{k: v for k, v in row.items() if k in present} for row in rows]
        old = table("results", *(column(k, results.c[k].type) for k in rows[0]))
        conn.execute(insert(old), rows)
    migrate(engine)
    with engine.connect() as conn:
        stored = dict(conn.execute(select(results.c.seq, results.c.sort_at)).all())
    engine.dispose()
    assert stored[1] == received  # the future one: bounded (no skew for rows from before)
    assert stored[2].year == 2026
