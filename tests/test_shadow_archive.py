"""The archive's side of shadow evaluation, on SQLite and PostgreSQL.

Through a real mosquitto and the real collector service: shadow results land in their own
table (never among results, alerts or the worklist), redeliveries are stored once, and one
claiming another device than its topic is refused.  ``GET /api/shadow`` compares a candidate
with serving: agreement, referral rates, and sensitivity/specificity on reviewed slides with
Wilson intervals; :func:`judge` applies the documented promotion criterion.
"""

from __future__ import annotations

import json
import threading
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from broker_support import Mosquitto, mosquitto_fixture, publish, wait_until  # noqa: F401
from collector_support import (
    database_url,  # noqa: F401
    make_result,
    postgres_server,  # noqa: F401
)
from sqlalchemy import func, select

from deploy.broker import find_mosquitto, free_port
from deploy.collector.config import load_collector_config
from deploy.collector.db import migrate, open_engine
from deploy.collector.service import ArchiveService
from deploy.collector.shadow import Criterion, ShadowArchive, judge, wilson
from deploy.collector.store import ArchiveStore
from deploy.collector.tables import alerts, results, reviews, shadow_results
from deploy.messages.shadow import ShadowMessage
from inference.result import ModelRef, Prediction

CANDIDATE = ModelRef(name="cand", version=5, sha256="c" * 64)
SERVING = ModelRef(name="omis-test", version=4, sha256="a" * 64)


def prediction(risk: str | None, p_high: float) -> Prediction:
    probabilities = {"low": 1 - p_high, "high": p_high}
    if risk is None:
        side = "high" if p_high >= 0.5 else "low"
        return Prediction(
            label=None,
            probabilities=probabilities,
            risk=None,
            abstained=True,
            p_high=p_high,
            side=side,
        )
    return Prediction(
        label=risk, probabilities=probabilities, risk=risk, abstained=False, p_high=p_high
    )


def shadow_for(result: dict[str, Any], risk: str | None, **kw: Any) -> dict[str, Any]:
    """The omis.shadow/1 of ``result``'s slide with the candidate calling ``risk``."""
    p = {"high": 0.9, "low": 0.1, None: 0.5}[risk]
    fields: dict[str, Any] = {
        "message_id": str(uuid.uuid4()),
        "serving_message_id": result["message_id"],
        "device_id": result["device_id"],
        "slide_id": result["slide_id"],
        "scan_id": result["scan_id"],
        "finished_at": "2026-01-01T12:00:01.000Z",
        "candidate": CANDIDATE,
        "serving": SERVING,
        "outcome": "classified" if risk else "abstained",
        "reason": None if risk else "uncertain",
        "prediction": prediction(risk, p),
        "serving_outcome": result["outcome"],
        "serving_label": result["prediction"].get("label"),
        "timings_ms": {"render": 1.0, "preprocess": 0.1, "infer": 0.5, "total": 1.6},
        "seq": result["seq"],
    }
    fields.update(kw)
    return ShadowMessage(**fields).to_json()


def _count(engine: Any, table: Any) -> int:
    with engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(table)).scalar_one())


@pytest.mark.skipif(find_mosquitto() is None, reason="mosquitto is not installed")
def test_shadow_results_are_archived_apart_and_a_forged_device_is_refused(
    mosquitto: Mosquitto, tmp_path: Path, db_url: str
) -> None:
    prefix = "omis/v1/scope-07"
    config = load_collector_config(
        environ={},
        overrides={
            "database": {"url": db_url},
            "mqtt": {"broker": mosquitto.url, "client_id": "archive-shadow"},
            "http": {"port": free_port()},
        },
    )
    service = ArchiveService(config, tmp_path / "state")
    stop = threading.Event()
    service.start()
    runner = threading.Thread(target=service.run, args=(stop,))
    runner.start()
    try:
        api = httpx.Client(base_url=service.http_url, timeout=10)
        assert service.subscriber is not None
        assert wait_until(service.subscriber.subscribed.is_set, 20)
        served = [make_result(i, p_high=0.2) for i in (1, 2, 3)]
        for result in served:
            publish(mosquitto.port, f"{prefix}/result", json.dumps(result))
        calls = ["low", "high", None]  # agrees, refers alone, abstains
        shadows = [shadow_for(r, c) for r, c in zip(served, calls, strict=True)]
        for shadow in shadows:
            publish(mosquitto.port, f"{prefix}/shadow", json.dumps(shadow))
        publish(mosquitto.port, f"{prefix}/shadow", json.dumps(shadows[0]))  # redelivery
        forged = shadow_for(served[0], "low", device_id="scope-08")
        publish(mosquitto.port, f"{prefix}/shadow", json.dumps(forged))
        publish(mosquitto.port, f"{prefix}/shadow", b"{not json")
        assert wait_until(lambda: service.subscriber.rejected == 2, 20)
        engine = open_engine(db_url, writer=False)
        assert wait_until(lambda: _count(engine, shadow_results) == 3, 20)
        assert wait_until(lambda: api.get("/api/results").json()["total"] == 3, 20)
        # A high-risk shadow call raises no alert; shadow results are not results.
        assert _count(engine, results) == 3
        with engine.connect() as conn:
            kinds = [k for (k,) in conn.execute(select(alerts.c.kind))]
        assert "high_risk" not in kinds
        body = api.get("/api/shadow", params={"candidate": CANDIDATE.sha256}).json()
        assert body == api.get("/api/shadow", params={"candidate": "cand:5"}).json() | {
            "candidate": CANDIDATE.sha256
        }
        assert body["counts"] == {
            "shadow_results": 3,
            "paired": 3,
            "by_device": {"scope-07": 3},
            "outcomes": {"classified": 2, "abstained": 1},
        }
        assert body["agreement"]["k"] == 1 and body["agreement"]["n"] == 3
        assert body["referral"]["candidate"]["k"] == 2
        assert body["referral"]["serving"]["k"] == 0
        assert (body["referral"]["candidate_only"], body["referral"]["serving_only"]) == (2, 0)
        assert body["referral"]["p_candidate_refers_more"] == 0.25
        # Set aside with the bytes as received and one reason each (GET /api/rejected).
        rejected = api.get("/api/rejected").json()
        reasons = " | ".join(r["reason"] for r in rejected["items"])
        assert "names device 'scope-08' but came on the topic of 'scope-07'" in reasons, reasons
        bad = api.get("/api/shadow", params={"candidate": "not a model"})
        assert bad.status_code == 422 and "candidate" in bad.text
        engine.dispose()
    finally:
        stop.set()
        runner.join(10)
        service.close()


def _review(engine: Any, message_id: str, bethesda: str, at_id: int) -> None:
    with engine.begin() as conn:
        conn.execute(
            reviews.insert().values(
                message_id=message_id,
                slide_id="s",
                bethesda=bethesda,
                adequacy="satisfactory",
                user_name="rev",
                role="cytotechnologist",
                created_at=datetime(2026, 1, 1, 12, 0, at_id),
            )
        )


def test_reviewed_slides_give_sensitivity_and_specificity_with_intervals(db_url: str) -> None:
    engine = open_engine(db_url)
    migrate(engine)
    reviews.create(engine, checkfirst=True)  # the review branch's table (same definition)
    store, archive = ArchiveStore(engine, high_risk_alerts=False), ShadowArchive(engine)
    # Serving calls every slide low; the candidate calls the two HSIL slides high.
    truth = ["HSIL", "HSIL", "NILM", "NILM", "LSIL", "NILM"]
    cand = ["high", "high", "low", "low", "low", "high"]
    for i, (verdict, call) in enumerate(zip(truth, cand, strict=True), start=1):
        result = make_result(i, p_high=0.1)
        store.add_result(result)
        archive.add("scope-07", json.dumps(shadow_for(result, call)).encode())
        if i == 1:
            _review(engine, result["message_id"], "NILM", 0)  # amended below: latest wins
        _review(engine, result["message_id"], verdict, i)
    body = archive.compare("cand:5")
    rev = body["reviewed"]
    assert (rev["slides"], rev["high"], rev["low"]) == (6, 2, 4)
    assert rev["candidate"]["sensitivity"] == {"k": 2, "n": 2, "rate": 1.0, "ci95": wilson(2, 2)}
    assert rev["serving"]["sensitivity"]["k"] == 0
    assert rev["candidate"]["specificity"]["k"] == 3 and rev["serving"]["specificity"]["k"] == 4
    lo, hi = wilson(3, 4) or [0, 0]
    assert 0 < lo < 0.75 < hi < 1
    passed, why = judge(body, Criterion(min_slides=6, min_agreement=0.5))
    assert passed, why
    passed, why = judge(body, Criterion(min_slides=7, min_agreement=0.5))
    assert not passed and "6 of 7" in why
    passed, why = judge(body, Criterion(min_slides=6, min_agreement=0.9))
    assert not passed and "agreement" in why
    engine.dispose()


def test_a_candidate_that_misses_reviewed_high_risk_slides_is_not_promoted(db_url: str) -> None:
    engine = open_engine(db_url)
    migrate(engine)
    reviews.create(engine, checkfirst=True)
    store, archive = ArchiveStore(engine, high_risk_alerts=False), ShadowArchive(engine)
    for i in range(1, 5):
        result = make_result(i, p_high=0.95)  # serving refers every slide
        store.add_result(result)
        archive.add("scope-07", json.dumps(shadow_for(result, "high" if i > 1 else "low")).encode())
        _review(engine, result["message_id"], "HSIL", i)
    passed, why = judge(archive.compare(CANDIDATE.sha256), Criterion(min_slides=4, min_agreement=0))
    assert not passed and "sensitivity" in why, why
    with pytest.raises(ValueError, match="names device"):
        archive.add("scope-09", json.dumps(shadow_for(make_result(9), "low")).encode())
    engine.dispose()
