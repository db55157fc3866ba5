"""``GET /api/performance``: figures equal an independent recomputation; alerts on flipped
verdicts and on shifted spectra."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from collector_support import database_url, postgres_server  # noqa: F401
from dataloop_support import AXIS, VERDICT, add_scan, open_archive, sign_out, simulator_spectra
from fastapi.testclient import TestClient
from sqlalchemy import select
from statsmodels.stats.proportion import proportion_confint

from deploy.collector.api import create_app
from deploy.collector.audit import Actor
from deploy.collector.auth import UserStore, hash_password
from deploy.collector.config import Account, HttpConfig
from deploy.collector.db import open_engine
from deploy.collector.loop_api import LoopSettings
from deploy.collector.monitor import PerformanceMonitor
from deploy.collector.performance import Limits, load_baselines
from deploy.collector.queries import ArchiveQueries
from deploy.collector.tables import alerts, reviews

PASSWORD = "correct horse"
HIGH = {"IV", "V"}


def _bundle(tmp_path: Path, sens: float = 0.9, spec: float = 0.9) -> Path:
    """A bundle manifest with the reference distribution training records."""
    root = tmp_path / "bundle"
    root.mkdir()
    centroids = [-15.0, -10.0, 10.0, 15.0]
    manifest = {
        "name": "omis-test",
        "version": 4,
        "training": {
            "metrics": {
                "reference_distribution": {
                    "n": 200,
                    "p_high": {
                        "edges": [round(0.1 * i, 1) for i in range(11)],
                        "counts": [30, 30, 30, 1, 1, 10, 1, 30, 30, 30],
                    },
                    "rates": {"sensitivity": sens, "specificity": spec, "referral_rate": 0.1},
                    "spectral_centroid_nm": {
                        "mean": float(np.mean(centroids)),
                        "sd": float(np.std(centroids, ddof=1)),
                        "n": 200,
                    },
                }
            }
        },
    }
    (root / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    return root


def _client(db_url: str, bundle: Path | None) -> TestClient:
    engine = open_engine(db_url, writer=False)
    writer = open_engine(db_url)
    accounts = [Account(name="op", role="operator", password_hash=hash_password(PASSWORD))]
    baselines = load_baselines([bundle]) if bundle else {}
    loop = LoopSettings(writer, baselines, Limits(min_n=10))
    # reviews, sessions and study records are written through ``writer`` (the reader is
    # read-only); the allowed hosts take localhost, not TestClient's default "testserver"
    app = create_app(
        ArchiveQueries(engine), HttpConfig(accounts=accounts), None, engine=writer, loop=loop
    )
    api = TestClient(app, base_url="http://localhost")
    api.auth = ("op", PASSWORD)
    return api


def _fill(db_url: str, n: int, *, flip: float = 0.0, shift_nm: float = 0.0, seed: int = 0) -> None:
    """n slides: device calls right 90 % of the time; ``flip`` of the verdicts contradict."""
    engine, store = open_archive(db_url)
    rng = np.random.default_rng(seed)
    for i in range(1, n + 1):
        group = str(rng.choice(["II", "III", "IV", "V"]))
        truth_high = group in HIGH
        right = rng.random() < 0.9
        p = float(rng.uniform(0.7, 0.99) if truth_high == right else rng.uniform(0.01, 0.3))
        kind = rng.random()
        extra: dict[str, Any] = {}
        if kind < 0.1:
            extra = {"abstained": True}
            p = 0.5
        elif kind < 0.15:
            extra = {"outcome": "failed", "stage": "qc", "reason": "no field passed QC"}
        r = add_scan(store, i, group, rng, p_high=p, shift_nm=shift_nm, day=1 + i % 3, **extra)
        if rng.random() < 0.8:  # some slides are not signed out yet
            verdict_group = group
            if rng.random() < flip:
                verdict_group = "II" if truth_high else "V"
            sign_out(
                engine,
                r,
                VERDICT[verdict_group],
                "unsatisfactory" if i % 29 == 0 else "satisfactory",
            )
    engine.dispose()


def _recompute(api: TestClient, db_url: str) -> dict[str, Any]:
    """From /api/results (the archive's own rows) and the reviews table, independently."""
    items = api.get("/api/results", params={"limit": 1000}).json()["items"]
    engine = open_engine(db_url, writer=False)
    with engine.connect() as conn:
        verdict: dict[str, Any] = {}
        for row in conn.execute(select(reviews).order_by(reviews.c.id)):
            verdict[row.message_id] = row  # the last one wins
    engine.dispose()
    tp = fn = tn = fp = 0
    for r in items:
        v = verdict.get(r["message_id"])
        if r["outcome"] != "classified" or v is None or v.adequacy != "satisfactory":
            continue
        truth = v.bethesda in ("ASC-H", "HSIL", "AGC", "AIS", "SCC", "adenocarcinoma")
        call = r["risk"] == "high"
        tp, fn = tp + (truth and call), fn + (truth and not call)
        tn, fp = tn + (not truth and not call), fp + (not truth and call)
    n = sum(1 for r in items if r["outcome"] != "cancelled")
    referred = sum(1 for r in items if r["outcome"] == "abstained")
    return {"confusion": {"tp": tp, "fn": fn, "tn": tn, "fp": fp}, "n": n, "referred": referred}


def test_performance_equals_an_independent_recomputation(db_url: str, tmp_path: Path) -> None:
    _fill(db_url, 120, seed=3)
    api = _client(db_url, _bundle(tmp_path))
    body = api.get("/api/performance").json()
    expected = _recompute(api, db_url)
    assert body["confusion"] == expected["confusion"]
    c = expected["confusion"]
    sens = body["sensitivity"]
    assert sens["value"] == pytest.approx(c["tp"] / (c["tp"] + c["fn"]))
    lo, hi = proportion_confint(c["tp"], c["tp"] + c["fn"], method="wilson")
    assert sens["ci95"] == pytest.approx([lo, hi], abs=1e-9)
    assert body["specificity"]["value"] == pytest.approx(c["tn"] / (c["tn"] + c["fp"]))
    assert body["referral_rate"]["value"] == pytest.approx(expected["referred"] / expected["n"])
    assert body["qc_failure_rate"]["n"] == expected["n"]
    assert [m["version"] for m in body["models"]] == [4]
    assert len(body["models"][0]["over_time"]) == 3
    assert body["models"][0]["alerts"] == []  # same as validated: nothing fires
    assert body["drift"]["p_high"]["psi"] is not None
    # filters narrow the same figures
    assert api.get("/api/performance", params={"device": "nope"}).json()["confusion"] == {
        "tp": 0, "fn": 0, "tn": 0, "fp": 0,
    }  # fmt: skip
    assert api.get("/api/performance", params={"since": "yesterday"}).status_code == 422


def test_flipped_verdicts_raise_a_performance_alert(db_url: str, tmp_path: Path) -> None:
    _fill(db_url, 150, flip=0.5, seed=4)
    bundle = _bundle(tmp_path)
    api = _client(db_url, bundle)
    found = {a["metric"] for a in api.get("/api/performance").json()["models"][0]["alerts"]}
    assert {"sensitivity", "specificity"} <= found
    writer = open_engine(db_url)
    monitor = PerformanceMonitor(
        writer, LoopSettings(writer, load_baselines([bundle]), Limits(min_n=10)), 60
    )
    assert monitor.check() >= 2
    assert monitor.check() >= 2  # idempotent: no duplicate alerts
    with writer.connect() as conn:
        rows = conn.execute(select(alerts.c.key, alerts.c.kind)).all()
    writer.dispose()
    assert sorted(k for k, kind in rows if kind == "performance") == [
        "performance:omis-test:4:sensitivity",
        "performance:omis-test:4:specificity",
    ]


def test_shifted_spectra_raise_a_drift_alert(db_url: str, tmp_path: Path) -> None:
    _fill(db_url, 60, shift_nm=30.0, seed=5)
    api = _client(db_url, _bundle(tmp_path))
    model = api.get("/api/performance").json()["models"][0]
    drift = model["drift"]["spectral_centroid"]
    assert drift["shift_nm"] > 20.0
    assert any(a["kind"] == "drift" and a["metric"] == "spectral_centroid" for a in model["alerts"])
    assert AXIS[0] < drift["observed_mean_nm"] < AXIS[-1]


def test_unshifted_spectra_raise_no_drift_alert(db_url: str, tmp_path: Path) -> None:
    _fill(db_url, 60, seed=5)
    model = _client(db_url, _bundle(tmp_path)).get("/api/performance").json()["models"][0]
    assert not [a for a in model["alerts"] if a["kind"] == "drift"]


def test_sign_out_through_the_api_amends(db_url: str, tmp_path: Path) -> None:
    _fill(db_url, 3, seed=6)
    api = _client(db_url, None)
    item = api.get("/api/results", params={"limit": 1}).json()["items"][0]
    url = f"/api/results/{item['message_id']}/review"
    verdict = {"bethesda": "NILM", "adequacy": "satisfactory"}
    assert api.post(url, json=verdict).status_code == 403  # review's rule: cytotech and above
    writer = open_engine(db_url)
    UserStore(writer).add("ct", "cytotech", PASSWORD, Actor("test-setup", "admin"))
    writer.dispose()
    api.auth = ("ct", PASSWORD)
    signed = api.post(url, json=verdict)
    assert signed.status_code == 201, signed.text
    first = signed.json()  # _fill signed every slide out already: this amends that verdict
    second = api.post(url, json={"bethesda": "HSIL", "adequacy": "satisfactory"}).json()
    assert second["review"]["supersedes"] == first["review"]["id"]
    assert second["report_status"] == "amended"
    assert api.post(url, json={"bethesda": "Pap III"}).status_code == 422
    assert api.put(f"/api/study/{item['slide_id']}", json={"patient_id": "P-1"}).status_code == 200


@pytest.mark.parametrize("shift_nm", [0.0, 3.0])
def test_drift_alert_on_shifted_simulator_spectra(tmp_path: Path, shift_nm: float) -> None:
    """The simulator's own spectra: a miscalibrated axis (shifted by 3 nm) raises the drift
    alert, the same instrument unshifted does not."""
    from deploy.collector.performance import centroid

    reference = simulator_spectra(11, 0, 20)
    service = simulator_spectra(11, 20, 20)
    bundle = _bundle(tmp_path)
    manifest = json.loads((bundle / "manifest.json").read_text())
    c = np.array([centroid(x.tolist(), y.tolist()) for _, x, y in reference])
    ref = manifest["training"]["metrics"]["reference_distribution"]
    ref["spectral_centroid_nm"] = {"mean": float(c.mean()), "sd": float(c.std(ddof=1)), "n": 20}
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    url = f"sqlite:///{tmp_path / 'archive.sqlite'}"
    engine, store = open_archive(url)
    rng = np.random.default_rng(8)
    for i, (group, x, y) in enumerate(service, start=1):
        shifted = np.interp(x - shift_nm, x, y, left=0.0, right=0.0)
        payload = {"algorithm": "omis-wdiff-v1", "axis": x.tolist(), "values": shifted.tolist()}
        p = 0.9 if group in HIGH else 0.1
        add_scan(store, i, group, rng, p_high=p, spectrum_json=payload)
    engine.dispose()
    model = _client(url, bundle).get("/api/performance").json()["models"][0]
    drift = model["drift"]["spectral_centroid"]
    fired = [a for a in model["alerts"] if a["metric"] == "spectral_centroid"]
    assert drift["shift_nm"] == pytest.approx(shift_nm, abs=1.0)
    assert bool(fired) is (shift_nm > 0)
