"""Test support for the archive's people: an API over a migrated database with one user per
role, logins with session cookies, and the FHIR validators (fhir.resources and npm ``fhir``)."""

from __future__ import annotations

import json
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient
from fhir.resources.R4B.bundle import Bundle
from sqlalchemy import Engine

from deploy.collector.api import create_app
from deploy.collector.audit import Actor
from deploy.collector.auth import ROLES, UserStore, hash_password
from deploy.collector.config import CollectorMqtt, HttpConfig, IngestConfig, ReviewConfig
from deploy.collector.db import migrate, open_engine
from deploy.collector.ingest import ArchiveSubscriber
from deploy.collector.queries import ArchiveQueries
from deploy.collector.store import ArchiveStore

PASSWORD = "correct horse ☂"
# one user per role, named after it
USERS = {role: f"{role}-1" for role in ROLES}
_HASH = hash_password(PASSWORD)  # one hash for every fixture user (argon2id is slow on purpose)
VALIDATOR = Path(__file__).resolve().parent / "tools" / "fhir-validator"


@dataclass
class Archive:
    """A migrated database with a store, users and an app."""

    engine: Engine
    store: ArchiveStore
    app: Any
    subscriber: ArchiveSubscriber | None = None  # the archive's MQTT session (open_archive mqtt=)

    def client(self, base_url: str = "http://localhost") -> TestClient:
        """A fresh client (its own cookie jar)."""
        return TestClient(self.app, base_url=base_url)

    def login(self, role: str) -> tuple[TestClient, str]:
        """A client logged in as the ``role`` user; (client, CSRF token)."""
        api = self.client()
        response = api.post("/api/login", json={"name": USERS[role], "password": PASSWORD})
        assert response.status_code == 200, response.text
        return api, response.json()["csrf_token"]

    def close(self) -> None:
        """Close the MQTT session, dispose of the engine."""
        if self.subscriber is not None:
            self.subscriber.close()
        self.engine.dispose()


def open_archive(
    db_url: str, *, share: float = 0.10, mqtt: CollectorMqtt | None = None, **http: Any
) -> Archive:
    """Migrated database, one user per role, the app (every request must authenticate);
    ``mqtt``: also the archive's MQTT session (started), which sends the API's commands."""
    engine = open_engine(db_url)
    migrate(engine)
    users = UserStore(engine)
    for role, name in USERS.items():
        users.add(name, role, PASSWORD, Actor("test-setup", "admin"), hashed=_HASH)
    config = HttpConfig(**http)
    store = ArchiveStore(engine)
    subscriber = None if mqtt is None else ArchiveSubscriber(mqtt, store, IngestConfig())
    app = create_app(
        ArchiveQueries(engine),
        config,
        None,
        engine=engine,
        review=ReviewConfig(qc_sample_share=share),
        commands=subscriber,
    )
    if subscriber is not None:
        subscriber.start()
    return Archive(engine, store, app, subscriber)


def node_validate(resources: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The npm ``fhir`` package's verdict on each resource (scripts/test-tools.sh installs it)."""
    node = shutil.which("node")
    if node is None or not (VALIDATOR / "node_modules" / "fhir").is_dir():
        raise RuntimeError("the FHIR validator is missing: run scripts/test-tools.sh")
    done = subprocess.run(
        [node, str(VALIDATOR / "validate.js")],
        input=json.dumps(resources),
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return [json.loads(line) for line in done.stdout.splitlines()]


def validate_both(bundles: list[dict[str, Any]]) -> None:
    """Every bundle valid for fhir.resources (R4B models) and for the npm ``fhir`` validator."""
    for bundle in bundles:
        Bundle.model_validate(bundle)
    for bundle, verdict in zip(bundles, node_validate(bundles), strict=True):
        assert verdict["valid"], (verdict["messages"], bundle)
