"""Archive accounts: session cookies, CSRF, bearer tokens, disabling, the KDF's limits, the
legacy ``http.accounts``, and the database upgrade from the schema of the previous release."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
from collector_support import database_url, make_result, postgres_server  # noqa: F401
from fastapi.testclient import TestClient
from review_support import PASSWORD, USERS, Archive, open_archive
from sqlalchemy import inspect, select, text

from deploy.cli import main
from deploy.collector.api import create_app
from deploy.collector.audit import Actor
from deploy.collector.auth import AuthError, hash_password, scrypt_hash
from deploy.collector.config import Account, HttpConfig
from deploy.collector.db import MIGRATIONS, migrate, open_engine
from deploy.collector.qcsample import qc_rank
from deploy.collector.queries import ArchiveQueries
from deploy.collector.store import result_row, utcnow
from deploy.collector.tables import audit, results


@pytest.fixture
def archive(db_url: str) -> Iterator[Archive]:
    found = open_archive(db_url, auth_failures_per_minute=5)
    yield found
    found.close()


def test_session_cookie_flags_and_csrf_bound_to_the_session(archive: Archive) -> None:
    plain = archive.client()
    response = plain.post("/api/login", json={"name": USERS["viewer"], "password": PASSWORD})
    cookie = response.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=strict" in cookie and "secure" not in cookie
    tls = archive.client("https://localhost")
    response = tls.post("/api/login", json={"name": USERS["viewer"], "password": PASSWORD})
    assert "secure" in response.headers["set-cookie"].lower()
    me = tls.get("/api/me").json()
    assert me["via"] == "session" and me["csrf_token"] == response.json()["csrf_token"]
    # another session's token does not fit this session
    other, other_csrf = archive.login("viewer")
    assert tls.post("/api/logout", headers={"X-CSRF-Token": other_csrf}).status_code == 403
    assert tls.post("/api/logout", headers={"X-CSRF-Token": me["csrf_token"]}).status_code == 204
    ended = tls.get("/api/me")
    assert ended.status_code == 401 and ended.headers["www-authenticate"] == "Basic"
    page = tls.get("/api/me", headers={"X-Requested-With": "fetch"})
    assert page.status_code == 401 and "www-authenticate" not in page.headers  # no browser dialog
    assert other.get("/api/me").status_code == 200
    assert plain.post("/api/login", json={"name": "x", "password": "y", "z": 1}).status_code == 422


def test_wrong_logins_are_one_message_audited_and_limited(archive: Archive) -> None:
    api = archive.client()
    answers = [
        api.post(  # ASCII-escaped JSON: a lone surrogate as a crafted client sends it
            "/api/login",
            content=json.dumps({"name": name, "password": password}),
            headers={"content-type": "application/json"},
        )
        for name, password in (
            (USERS["admin"], "wrong"),
            ("nobody", PASSWORD),
            (USERS["admin"], PASSWORD.encode("utf-8").decode("latin-1")),
            ("no\x00body", "x"),
        )
    ]
    assert [a.status_code for a in answers] == [401] * 4
    assert {a.json()["detail"] for a in answers} == {"wrong user name or password"}
    crafted = api.post(
        "/api/login",
        content=json.dumps({"name": "x", "password": "secret \udc80", "extra": "secret"}),
        headers={"content-type": "application/json"},
    )
    assert crafted.status_code == 422 and "secret" not in crafted.text  # never echoed
    assert {tuple(e["loc"]) for e in crafted.json()["detail"]} == {
        ("body", "password"), ("body", "extra")
    }  # fmt: skip
    api.post("/api/login", json={"name": USERS["admin"], "password": "wrong again"})
    limited = api.post("/api/login", json={"name": USERS["admin"], "password": PASSWORD})
    assert limited.status_code == 429 and int(limited.headers["retry-after"]) >= 1
    with archive.engine.connect() as conn:
        failed = conn.execute(select(audit.c.user_name).where(audit.c.action == "login.failed"))
        assert len(failed.all()) == 5


def test_bearer_tokens_and_disabling_a_user(archive: Archive) -> None:
    from deploy.collector.auth import UserStore

    users = UserStore(archive.engine)
    token = users.new_token(USERS["cytotech"], "ci", Actor("test", "admin"))
    program = archive.client()
    bearer = {"Authorization": f"Bearer {token}"}
    assert program.get("/api/me", headers=bearer).json() == {
        "name": USERS["cytotech"], "role": "cytotech", "via": "token"
    }  # fmt: skip
    assert program.get("/api/me", headers={"Authorization": "Bearer omis_nope"}).status_code == 401
    session, _ = archive.login("cytotech")
    basic = archive.client()
    basic.auth = (USERS["cytotech"], PASSWORD)
    assert basic.get("/api/me").status_code == 200
    users.disable(USERS["cytotech"], Actor("test", "admin"))
    assert program.get("/api/me", headers=bearer).status_code == 401
    assert session.get("/api/me").status_code == 401
    assert basic.get("/api/me").status_code == 401  # no cached pass for a disabled user
    admin, _ = archive.login("admin")
    listed = {u["name"]: u for u in admin.get("/api/users").json()}
    assert listed[USERS["cytotech"]]["disabled"] is True
    assert "password_hash" not in json.dumps(listed)
    actions = [e["action"] for e in admin.get("/api/audit").json()["items"]]
    assert {"user.token", "user.disable"} <= set(actions)


def test_password_checks_are_bounded(tmp_path: Path) -> None:
    engine = open_engine(f"sqlite:///{tmp_path / 'a.sqlite'}")
    migrate(engine)
    from deploy.collector.auth import Authenticator, UserStore

    auth = Authenticator(UserStore(engine), [], kdf_concurrency=1, kdf_wait_s=0.05)
    auth._kdf.acquire()  # another request is hashing
    try:
        with pytest.raises(AuthError) as busy:
            auth.check_password("nobody", "x", "10.0.0.1")
        assert busy.value.status == 503 and busy.value.retry_after
    finally:
        auth._kdf.release()
    engine.dispose()


def test_legacy_http_accounts_keep_working_with_a_message(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    engine = open_engine(f"sqlite:///{tmp_path / 'a.sqlite'}")
    migrate(engine)
    accounts = [
        Account(name="old", role="operator", password_hash=scrypt_hash("pässword")),
        Account(name="new", role="viewer", password_hash=hash_password("x")),
    ]
    with caplog.at_level(logging.WARNING):
        api = TestClient(
            create_app(ArchiveQueries(engine), HttpConfig(accounts=accounts), None),
            base_url="http://localhost",
        )
    assert "omis collect user import" in caplog.text
    api.auth = ("old", "pässword")
    assert api.get("/api/me").json()["role"] == "operator"
    assert api.get("/api/me", auth=("new", "x")).json()["role"] == "viewer"
    assert api.get("/api/me", auth=("old", "password")).status_code == 401
    browser = TestClient(api.app, base_url="http://localhost")
    login = browser.post("/api/login", json={"name": "old", "password": "pässword"})
    assert login.status_code == 200  # a legacy account gets a session like anyone
    csrf = login.json()["csrf_token"]
    assert browser.get("/api/me").json() == {
        "name": "old", "role": "operator", "via": "session", "csrf_token": csrf
    }  # fmt: skip
    # the migration: `omis collect user import` moves the accounts, hashes and all
    config = tmp_path / "collect.yaml"
    config.write_text(json.dumps({"http": {"accounts": [a.model_dump() for a in accounts]}}))
    db = f"sqlite:///{tmp_path / 'a.sqlite'}"
    assert main(["collect", "user", "import", "--config", str(config), "--db", db]) == 0
    moved = TestClient(
        create_app(ArchiveQueries(engine), HttpConfig(), None), base_url="http://localhost"
    )
    assert moved.get("/api/me", auth=("old", "pässword")).json()["role"] == "operator"
    assert moved.get("/api/me", auth=("new", "x")).json()["via"] == "basic"
    engine.dispose()


def test_upgrade_from_the_previous_release_keeps_rows_and_draws_the_qc_sample(db_url: str) -> None:
    from alembic import command
    from alembic.config import Config as AlembicConfig

    engine = open_engine(db_url)
    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    with engine.begin() as conn:  # the schema main ships today, with rows in it
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "0001")
    old = [make_result(i, p_high=0.9 if i == 1 else 0.1) for i in (1, 2, 3)]
    with engine.begin() as conn:
        # only the columns release 0001 has (later revisions add sort_at, qc_rank, ...)
        present = {c["name"] for c in inspect(conn).get_columns("results")}
        for result in old:
            row = result_row(result, utcnow())
            conn.execute(results.insert().values(**{k: v for k, v in row.items() if k in present}))
        conn.execute(
            text(
                "INSERT INTO alerts (key, kind, device_id, detail, created_at) "
                "VALUES ('k', 'offline', 'scope-07', 'gone', :t)"
            ),
            {"t": utcnow()},
        )
    migrate(engine)
    tables = set(inspect(engine).get_table_names())
    assert {"users", "api_tokens", "sessions", "reviews", "claims", "audit"} <= tables
    with engine.connect() as conn:
        ranks = dict(conn.execute(select(results.c.message_id, results.c.qc_rank)).all())
        alert = conn.execute(text("SELECT count, acked_at FROM alerts")).one()
    assert ranks == {r["message_id"]: qc_rank(r["message_id"]) for r in old}
    assert tuple(alert) == (1, None)
    engine.dispose()
    archive = open_archive(db_url)  # the upgraded database serves the new API
    try:
        api, csrf = archive.login("cytotech")
        mid = old[0]["message_id"]
        assert mid in {i["message_id"] for i in api.get("/api/worklist").json()["items"]}
        signed = api.post(
            f"/api/results/{mid}/review",
            json={"bethesda": "LSIL", "adequacy": "satisfactory"},
            headers={"X-CSRF-Token": csrf},
        )
        assert signed.status_code == 201
    finally:
        archive.close()
