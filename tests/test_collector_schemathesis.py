"""Schemathesis against the archive's HTTP API (issue 20): the OpenAPI document describes the
real responses (status codes, media types, bodies) and nothing answers 5xx.

The app runs on SQLite with a few results, alerts and a device stored; once with credentials
(every operation, positive and negative cases) and once without (every answer a documented
401).  Bounded and deterministic: derandomised Hypothesis, a fixed number of cases per
operation, no deadline (scrypt per request on 2 shared cores).
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import schemathesis
import uvicorn
from collector_support import make_result
from fastapi import FastAPI
from hypothesis import HealthCheck, settings
from schemathesis.specs.openapi.checks import ignored_auth
from sqlalchemy import create_engine

from deploy.collector.api import create_app
from deploy.collector.auth import hash_password
from deploy.collector.config import Account, HttpConfig
from deploy.collector.db import migrate, open_engine
from deploy.collector.queries import ArchiveQueries
from deploy.collector.store import ArchiveStore
from deploy.messages.testing import status_message

PASSWORD = "correct horse"
CASES = 25  # per operation, on top of schemathesis's examples and coverage phases


def _config(*, auth_on_localhost: bool) -> HttpConfig:
    accounts = [Account(name="lab", role="viewer", password_hash=hash_password(PASSWORD))]
    return HttpConfig(
        accounts=accounts,
        allowed_hosts=["127.0.0.1"],
        require_auth_on_localhost=auth_on_localhost,
    )


# auth off: localhost needs no account (the default), so the long run costs no scrypt per request
OPEN = _config(auth_on_localhost=False)
# auth on: every request authenticates, localhost included
CONFIG = _config(auth_on_localhost=True)


def _schema(*, coverage: bool) -> Any:
    """The app's own document (building it touches no database)."""
    document = create_app(ArchiveQueries(create_engine("sqlite://")), CONFIG, None).openapi()
    loaded = schemathesis.openapi.from_dict(document)
    # credentials are the tests' business (runs with and without), not a generated parameter
    loaded.config.generation.update(with_security_parameters=False)
    loaded.config.phases.coverage.enabled = coverage  # the boundary-value phase: long run only
    return loaded


schema = _schema(coverage=True)
short = _schema(coverage=False)


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """Real HTTP servers (auth off, auth on) over one archive on SQLite with a few results,
    alerts and devices."""
    url = f"sqlite:///{tmp_path_factory.mktemp('schemathesis') / 'archive.sqlite'}"
    engine = open_engine(url)
    migrate(engine)
    store = ArchiveStore(engine)
    for seq, (p_high, extra) in enumerate(
        [
            (0.91, {}),
            (0.08, {}),
            (0.55, {"abstained": True}),
            (0.2, {"outcome": "failed", "stage": "acquire", "reason": "focus lost"}),
            (0.2, {"outcome": "cancelled", "reason": "cmd/cancel"}),
        ],
        start=1,
    ):
        store.add_result(make_result(seq * 2, p_high=p_high, **extra))  # seq gaps: alerts
    store.set_status("scope-07", status_message("idle").to_json())
    store.set_availability("scope-08", "offline")
    reader = open_engine(url, writer=False)
    started = {
        name: _serve(create_app(ArchiveQueries(reader), config, None))
        for name, config in (("open", OPEN), ("auth", CONFIG))
    }
    yield {name: url for name, (url, _) in started.items()}
    for _, stop in started.values():
        stop()
    reader.dispose()
    engine.dispose()


def _serve(app: FastAPI) -> tuple[str, Callable[[], None]]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    uv = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
    thread = threading.Thread(target=uv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not uv.started and time.monotonic() < deadline:
        time.sleep(0.02)  # readiness, polled
    assert uv.started, "uvicorn did not start"

    def stop() -> None:
        uv.should_exit = True
        thread.join(10)
        sock.close()

    return f"http://127.0.0.1:{sock.getsockname()[1]}", stop


@schema.parametrize()
@settings(
    max_examples=CASES,
    derandomize=True,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    database=None,
)
def test_api_matches_its_openapi_document(servers: dict[str, str], case: schemathesis.Case) -> None:
    # localhost without an account is this server's configuration, not an ignored login
    case.call_and_validate(base_url=servers["open"], excluded_checks=[ignored_auth])


@short.parametrize()
@settings(
    max_examples=3,
    derandomize=True,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    database=None,
)
def test_with_auth_on_and_credentials_too(servers: dict[str, str], case: schemathesis.Case) -> None:
    case.call_and_validate(base_url=servers["auth"], auth=("lab", PASSWORD))


@short.parametrize()
@settings(
    max_examples=5,
    derandomize=True,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    database=None,
)
def test_without_credentials_every_answer_is_a_documented_401(
    servers: dict[str, str], case: schemathesis.Case
) -> None:
    response = case.call(base_url=servers["auth"])
    # 422: a malformed request is refused before the credentials are looked at; the login
    # itself answers a wrong password with 401 and, after many, 429 (both documented)
    expected = (401, 422, 429) if case.path == "/api/login" else (401, 422)
    assert response.status_code in expected, (case.method, response.text[:200])
    case.validate_response(response)


def test_the_document_declares_the_real_media_types() -> None:
    paths = schema.raw_schema["paths"]
    ok = {
        path: paths[path]["get"]["responses"]["200"]["content"]
        for path in paths
        if "get" in paths[path]
    }
    assert set(ok["/api/results.csv"]) == {"text/csv"}
    assert set(ok["/api/results/{message_id}/fhir"]) == {"application/fhir+json"}
    for path in ("/api/results", "/api/results/{message_id}", "/api/devices", "/api/alerts"):
        assert "$ref" in str(ok[path]["application/json"]["schema"]), path  # a typed model
    for path, operations in paths.items():
        for method, operation in operations.items():
            assert "401" in operation["responses"], (method, path)
