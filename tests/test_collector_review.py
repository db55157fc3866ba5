"""Issue 22: worklist, sign-out and amendment, people and roles, audit, alert acks, FHIR.

Against the real app (TestClient) over SQLite and a real PostgreSQL; FHIR validated by
fhir.resources and, independently, by the npm ``fhir`` package under Node.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from collector_support import database_url, make_result, postgres_server  # noqa: F401
from review_support import PASSWORD, USERS, Archive, open_archive, validate_both
from sqlalchemy import func, select

from deploy.collector.bethesda import CATEGORIES, MAPPING
from deploy.collector.qcsample import qc_rank
from deploy.collector.store import result_row, utcnow
from deploy.collector.tables import audit, reviews
from deploy.exceptions import MessageRejectedError


@pytest.fixture
def archive(db_url: str) -> Iterator[Archive]:
    found = open_archive(db_url)
    yield found
    found.close()


def _add(archive: Archive, seq: int, **kw: Any) -> dict[str, Any]:
    result = make_result(seq, finished_at=f"2026-01-01T12:00:{seq:02d}.000Z", **kw)
    archive.store.add_result(result)
    return result


def _add_as_stored_before_the_contract(
    archive: Archive, seq: int, extra: dict[str, Any]
) -> dict[str, Any]:
    """A row as a release before the contract's model check stored ``extra`` over a valid
    result (the columns follow the payload, as that release's writer derived them)."""
    valid = make_result(seq, finished_at=f"2026-01-01T12:00:{seq:02d}.000Z", p_high=0.3)
    row = result_row(valid, utcnow())
    old = {**valid, **extra}
    prediction, model = old.get("prediction") or {}, old.get("model") or {}
    row.update(
        payload=json.dumps(old),
        slide_id=old["slide_id"],
        label=prediction.get("label"),
        risk=prediction.get("risk"),
        model_name=model.get("name"),
        model_version=model.get("version"),
        model_sha256=model.get("sha256"),
    )
    archive.store.insert_many([row])
    return old


def _count(archive: Archive, table: Any) -> int:
    with archive.engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(table)).scalar_one())


def _fhir(archive: Archive, message_id: str) -> dict[str, Any]:
    api, _ = archive.login("viewer")
    response = api.get(f"/api/results/{message_id}/fhir")
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/fhir+json"
    return response.json()  # type: ignore[no-any-return]


def _resources(bundle: dict[str, Any], kind: str) -> list[dict[str, Any]]:
    return [e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == kind]


def _texts(value: Any) -> Iterator[str]:
    if isinstance(value, dict):
        for v in value.values():
            yield from _texts(v)
    elif isinstance(value, list):
        for v in value:
            yield from _texts(v)
    elif isinstance(value, str):
        yield value


def test_sign_out_and_amend_move_fhir_from_preliminary_to_final_to_amended(
    archive: Archive,
) -> None:
    high = _add(archive, 1, slide="S-0001", p_high=0.923456789)
    mid = high["message_id"]
    bundles = [_fhir(archive, mid)]
    report = _resources(bundles[0], "DiagnosticReport")[0]
    assert report["status"] == "preliminary"
    call = next(
        o
        for o in _resources(bundles[0], "Observation")
        if o["code"]["coding"][0]["code"] == "device-call"
    )
    assert "omis-test v4" in call["method"]["text"] and "cd" * 32 in call["method"]["text"]
    assert "research use" in call["method"]["text"]
    assert call["valueCodeableConcept"]["coding"][0]["code"] == "high"
    specimen = _resources(bundles[0], "Specimen")[0]
    assert specimen["accessionIdentifier"]["value"] == "S-0001"
    assert "resultsInterpreter" not in report

    api, csrf = archive.login("cytotech")
    first = api.post(
        f"/api/results/{mid}/review",
        json={"bethesda": "HSIL", "adequacy": "satisfactory", "comment": "see /srv/x.png"},
        headers={"X-CSRF-Token": csrf},
    )
    assert first.status_code == 201, first.text
    assert first.json()["report_status"] == "final"
    assert first.json()["review"]["pap_group"] == "IV"
    bundles.append(_fhir(archive, mid))
    report = _resources(bundles[1], "DiagnosticReport")[0]
    assert report["status"] == "final"
    assert report["conclusionCode"][0]["coding"][0]["code"] == "HSIL"
    interpreter = _resources(bundles[1], "Practitioner")[0]
    assert interpreter["identifier"][0]["value"] == USERS["cytotech"]
    assert report["resultsInterpreter"][0]["reference"] == f"urn:uuid:{interpreter['id']}"

    pathologist, csrf2 = archive.login("pathologist")
    second = pathologist.post(
        f"/api/results/{mid}/review",
        json={"bethesda": "SCC", "adequacy": "satisfactory"},
        headers={"X-CSRF-Token": csrf2},
    )
    assert second.status_code == 201 and second.json()["report_status"] == "amended"
    assert second.json()["review"]["supersedes"] == first.json()["review"]["id"]
    bundles.append(_fhir(archive, mid))
    report = _resources(bundles[2], "DiagnosticReport")[0]
    assert report["status"] == "amended"
    assert report["conclusionCode"][0]["coding"][0]["code"] == "SCC"

    shown = api.get(f"/api/results/{mid}").json()
    assert [r["bethesda"] for r in shown["reviews"]] == ["HSIL", "SCC"]  # the history stays
    assert shown["verdict"]["user_name"] == USERS["pathologist"]
    assert shown["report_status"] == "amended"
    for bundle in bundles:
        assert not any("/srv" in t or "None" in t for t in _texts(bundle))
        assert "0.923456789" not in json.dumps(bundle)
    validate_both(bundles)

    admin, _ = archive.login("admin")
    trail = admin.get("/api/audit", params={"target": mid}).json()["items"]
    assert [e["action"] for e in trail] == ["review.amend", "review.sign_out"]
    assert trail[0]["user_name"] == USERS["pathologist"]
    assert trail[0]["detail"]["previous"]["bethesda"] == "HSIL"
    assert trail[0]["detail"]["new"]["bethesda"] == "SCC"


@pytest.mark.parametrize(
    "extra",
    [
        {"outcome": "failed", "stage": "acquire", "reason": "cannot open /dev/ttyACM0: busy"},
        {"outcome": "abstained", "reason": "uncertain_probability"},
        {"outcome": "abstained", "reason": "no_usable_field"},
        {"outcome": "cancelled", "reason": "cmd/cancel"},
        {"prediction": {"label": None, "risk": None, "probabilities": {}, "abstained": False}},
        {"model": {}, "patient_id": "P-17", "slide_id": "C:\\slides\\S 1"},
    ],
    ids=["failed-path", "abstained", "no-fields", "cancelled", "classified-no-risk", "odd"],
)
def test_fhir_of_every_outcome_says_what_it_is(archive: Archive, extra: dict[str, Any]) -> None:
    try:
        result = _add(archive, 1, p_high=0.3, **extra)
    except MessageRejectedError:
        # the contract's model refuses it today (no call / no model name / a path as slide id):
        # it can only be a row an earlier release stored, and its report must still be right
        assert "prediction" in extra or "model" in extra
        result = _add_as_stored_before_the_contract(archive, 1, extra)
    bundle = _fhir(archive, result["message_id"])
    report = _resources(bundle, "DiagnosticReport")[0]
    outcome = extra.get("outcome", "classified")
    assert report["status"] == (
        "cancelled" if outcome in ("failed", "cancelled") else "preliminary"
    )
    texts = list(_texts(bundle))
    if "patient_id" in extra:
        subject = {"identifier": {"system": "urn:omis:patient", "value": "P-17"}}
        assert report["subject"] == subject
        assert (
            _resources(bundle, "Specimen")[0]["accessionIdentifier"]["value"] == "C:\\slides\\S 1"
        )
    assert not any("/dev/" in t or "None" in t for t in texts), texts
    observations = _resources(bundle, "Observation")
    risks = [
        o
        for o in observations
        if "urn:omis:risk" in json.dumps(o.get("valueCodeableConcept"))
        or "risk" in o["code"]["coding"][0]["code"]
    ]
    decided = outcome == "classified" and "prediction" not in extra
    assert len(risks) == decided  # an undecided slide never carries a risk call
    validate_both([bundle])


def test_review_refusals_write_nothing(archive: Archive) -> None:
    mid = _add(archive, 1, p_high=0.9)["message_id"]
    api, csrf = archive.login("cytotech")
    good = {"bethesda": "NILM", "adequacy": "satisfactory"}
    url = f"/api/results/{mid}/review"
    refused = [
        (api.post(url, json={**good, "verdict": "x"}, headers={"X-CSRF-Token": csrf}), 422),
        (api.post(url, json={**good, "bethesda": "CIN2"}, headers={"X-CSRF-Token": csrf}), 422),
        (api.post(url, json={**good, "adequacy": "fine"}, headers={"X-CSRF-Token": csrf}), 422),
        (api.post(url, json={"adequacy": "satisfactory"}, headers={"X-CSRF-Token": csrf}), 422),
        (api.post(url, json={**good, "comment": "a\x00b"}, headers={"X-CSRF-Token": csrf}), 422),
        (
            api.post(
                url,
                content=json.dumps({**good, "comment": "\ud800"}),
                headers={"X-CSRF-Token": csrf, "content-type": "application/json"},
            ),
            422,
        ),
        (api.post(url, json=good), 403),  # cookie without the CSRF header
        (api.post(url, json=good, headers={"X-CSRF-Token": "forged"}), 403),
        (
            api.post(
                "/api/results/00000000-0000-4000-8000-000000000000/review",
                json=good,
                headers={"X-CSRF-Token": csrf},
            ),
            404,
        ),
    ]
    # not a result's id: 404 before any SQL; a control character: the bounded path parameter's
    # 422 naming it (labsec's rule for every path parameter)
    for unknown, status in (("not-a-result", 404), ("no%00id", 422)):
        refused.append(
            (
                api.post(
                    f"/api/results/{unknown}/review", json=good, headers={"X-CSRF-Token": csrf}
                ),
                status,
            )
        )
    for role in ("viewer", "operator"):
        other, other_csrf = archive.login(role)
        refused.append((other.post(url, json=good, headers={"X-CSRF-Token": other_csrf}), 403))
    anonymous = archive.client()
    refused.append((anonymous.post(url, json=good), 401))
    for response, status in refused:
        assert response.status_code == status, response.text
        assert response.json()["detail"]
    assert _count(archive, reviews) == 0
    for path in ("/api/results/no%00id", "/api/results/no%00id/fhir"):
        response = api.get(path)
        assert response.status_code == 422
        assert response.json()["detail"][0]["loc"] == ["path", "message_id"]
    assert api.get("/api/results/not-a-result").status_code == 404
    with archive.engine.connect() as conn:
        actions = conn.execute(select(audit.c.action)).scalars().all()
    assert not [a for a in actions if a.startswith("review")]
    # a browser's remembered Basic credentials on another site's form: refused
    basic = archive.client()
    basic.auth = (USERS["cytotech"], PASSWORD)
    for foreign in ({"Sec-Fetch-Site": "cross-site"}, {"Origin": "http://evil.example"}):
        assert basic.post(url, json=good, headers=foreign).status_code == 403
    assert _count(archive, reviews) == 0
    # programs (Basic, bearer) send no ambient credential: no CSRF token needed
    assert basic.post(url, json={"adequacy": "unsatisfactory", "bethesda": None}).status_code == 201


def test_worklist_reasons_qc_sample_filters_and_claims(db_url: str) -> None:
    archive = open_archive(db_url, share=0.5)
    try:
        lows = [_add(archive, i, p_high=0.1) for i in range(1, 21)]
        high = _add(archive, 21, p_high=0.9)
        unsure = _add(archive, 22, p_high=0.55, outcome="abstained", reason="uncertain_probability")
        fields = _add(archive, 23, outcome="abstained", reason="no_usable_field")
        failed = _add(archive, 24, outcome="failed", stage="infer", reason="boom")
        _add(archive, 25, outcome="cancelled", reason="cmd/cancel")
        api, csrf = archive.login("cytotech")
        body = api.get("/api/worklist", params={"limit": 100}).json()
        reasons = {i["message_id"]: i["reason"] for i in body["items"]}
        drawn = {r["message_id"] for r in lows if qc_rank(r["message_id"]) < 0.5}
        assert 0 < len(drawn) < 20
        expected = {m: "qc_sample" for m in drawn} | {
            high["message_id"]: "high_risk",
            unsure["message_id"]: "abstained",
            fields["message_id"]: "insufficient_fields",
            failed["message_id"]: "failed_scan",
        }
        assert reasons == expected and body["total"] == len(expected)
        finished = [i["finished_at"] for i in body["items"]]
        assert finished == sorted(finished)  # oldest first
        page = api.get("/api/worklist", params={"limit": 2, "offset": 1}).json()
        assert [i["message_id"] for i in page["items"]] == [
            i["message_id"] for i in body["items"][1:3]
        ]
        only = api.get("/api/worklist", params={"reason": "high_risk"}).json()["items"]
        assert [i["message_id"] for i in only] == [high["message_id"]]
        assert api.get("/api/worklist", params={"reason": "bogus"}).status_code == 422

        mid = high["message_id"]
        claim = api.post(f"/api/worklist/{mid}/claim", json={}, headers={"X-CSRF-Token": csrf})
        assert claim.status_code == 200 and claim.json()["claimed_by"] == USERS["cytotech"]
        mine = api.get("/api/worklist", params={"claimed_by": USERS["cytotech"]}).json()["items"]
        assert [i["message_id"] for i in mine] == [mid]
        other = archive.login("admin")
        stolen = other[0].post(
            f"/api/worklist/{unsure['message_id']}/claim",
            json={"user": USERS["viewer"]},
            headers={"X-CSRF-Token": other[1]},
        )
        assert stolen.status_code == 409  # a viewer may not review: cannot be assigned
        pathologist, pcsrf = archive.login("pathologist")
        assigned = pathologist.post(
            f"/api/worklist/{mid}/claim",
            json={"user": USERS["admin"]},
            headers={"X-CSRF-Token": pcsrf},
        )
        assert (
            assigned.status_code == 200 and assigned.json()["assigned_by"] == USERS["pathologist"]
        )
        taken = api.post(f"/api/worklist/{mid}/claim", json={}, headers={"X-CSRF-Token": csrf})
        assert taken.status_code == 409
        assign = api.post(
            f"/api/worklist/{unsure['message_id']}/claim",
            json={"user": USERS["pathologist"]},
            headers={"X-CSRF-Token": csrf},
        )
        assert assign.status_code == 403  # a cytotech claims, a pathologist assigns

        signed = api.post(
            f"/api/results/{mid}/review",
            json={"bethesda": "ASC-H", "adequacy": "satisfactory"},
            headers={"X-CSRF-Token": csrf},
        )
        assert signed.status_code == 201
        open_ids = {i["message_id"] for i in api.get("/api/worklist").json()["items"]}
        assert mid not in open_ids
        done = api.get("/api/worklist", params={"signed": "true"}).json()["items"]
        assert [(i["message_id"], i["verdict"]["bethesda"]) for i in done] == [(mid, "ASC-H")]
    finally:
        archive.close()


def test_alert_ack_roles_conflict_and_audit(archive: Archive) -> None:
    high = _add(archive, 1, slide="S-0777", p_high=0.91)
    viewer, _ = archive.login("viewer")
    alerts = viewer.get("/api/alerts", params={"kind": "high_risk"}).json()
    assert len(alerts) == 1 and alerts[0]["message_id"] == high["message_id"]
    alert = alerts[0]
    assert (
        alert["detail"] == "Slide S-0777 on scope-07: high risk, p(high) 0.91 (model omis-test v4)"
    )
    url = f"/api/alerts/{alert['id']}/ack"
    operator, ocsrf = archive.login("operator")
    assert operator.post(url, json={}, headers={"X-CSRF-Token": ocsrf}).status_code == 403
    assert viewer.post(url, json={}).status_code == 403
    cytotech, csrf = archive.login("cytotech")
    assert cytotech.post(url, json={"x": 1}, headers={"X-CSRF-Token": csrf}).status_code == 422
    assert cytotech.post(url, json={}).status_code == 403  # no CSRF header
    acked = cytotech.post(url, json={"note": "called"}, headers={"X-CSRF-Token": csrf})
    assert acked.status_code == 200
    assert acked.json()["acked_by"] == USERS["cytotech"] and acked.json()["acked_at"]
    again = cytotech.post(url, json={}, headers={"X-CSRF-Token": csrf})
    assert again.status_code == 409 and USERS["cytotech"] in again.json()["detail"]
    assert viewer.get("/api/alerts", params={"open": "true"}).json() == []
    assert (
        cytotech.post("/api/alerts/999999/ack", json={}, headers={"X-CSRF-Token": csrf}).status_code
        == 404
    )
    # a new high-risk result of the slide after the ack opens a new alert
    _add(archive, 2, slide="S-0777", p_high=0.95)
    assert len(viewer.get("/api/alerts", params={"open": "true"}).json()) == 1

    admin, acsrf = archive.login("admin")
    assert viewer.get("/api/audit").status_code == 403
    trail = admin.get("/api/audit", params={"action": "alert.ack"}).json()
    assert trail["total"] == 1
    entry = trail["items"][0]
    assert entry["user_name"] == USERS["cytotech"] and entry["detail"]["note"] == "called"
    # nothing in the trail can be changed through the API
    for method in ("put", "patch", "delete"):
        for path in ("/api/audit", f"/api/audit/{entry['id']}"):
            response = admin.request(method.upper(), path, headers={"X-CSRF-Token": acsrf})
            assert response.status_code in (404, 405), (method, path)
    assert admin.get("/api/audit", params={"action": "alert.ack"}).json()["items"] == [entry]


def test_one_open_high_risk_alert_per_slide_and_never_displaced(archive: Archive) -> None:
    _add(archive, 2, slide="S-9", p_high=0.9, boot="b-main")
    _add(archive, 3, slide="S-9", p_high=0.97, boot="b-main")
    for i in range(50):  # 50 single-message boots: each opens a seq-gap alert
        _add(archive, 5, boot=f"b-{i}", p_high=0.1, slide=f"L-{i}")
    viewer, _ = archive.login("viewer")
    response = viewer.get("/api/alerts", params={"limit": 50})
    page = response.json()
    assert int(response.headers["x-total-count"]) == 52
    high = [a for a in page if a["kind"] == "high_risk"]
    assert len(high) == 1 and high[0]["count"] == 2 and "0.97" in high[0]["detail"]
    assert page[0]["kind"] == "high_risk"
    gap = next(a for a in page if a["kind"] == "seq_gap")
    assert "results 1\u20134 of the boot started 2026-01-01 11:59 UTC not received" in gap["detail"]
    rest = viewer.get("/api/alerts", params={"limit": 50, "offset": 50}).json()
    assert len(rest) == 2 and all(a["kind"] == "seq_gap" for a in rest)
    kinds = viewer.get("/api/alerts", params={"kind": "seq_gap", "limit": 5}).json()
    assert len(kinds) == 5 and {a["kind"] for a in kinds} == {"seq_gap"}


def test_reused_sequence_numbers_raise_an_alert(archive: Archive) -> None:
    _add(archive, 1, boot="b-1", slide="A-1")
    _add(archive, 1, boot="b-1", slide="A-2")  # same boot, same seq, another message
    viewer, _ = archive.login("viewer")
    reused = viewer.get("/api/alerts", params={"kind": "seq_reused"}).json()
    assert len(reused) == 1
    assert reused[0]["seq_from"] == 1 and "A-1, A-2" in reused[0]["detail"]


def test_bethesda_mapping_covers_every_category() -> None:
    assert set(CATEGORIES) == {
        "NILM", "ASC-US", "LSIL", "ASC-H", "HSIL", "SCC", "AGC", "AIS", "adenocarcinoma"
    }  # fmt: skip
    assert {c: (m.pap_group, m.risk) for c, m in MAPPING.items()} == {
        "NILM": ("II", "low"), "ASC-US": ("III", "low"), "LSIL": ("III", "low"),
        "ASC-H": ("IV", "high"), "HSIL": ("IV", "high"), "AGC": ("IV", "high"),
        "AIS": ("V", "high"), "SCC": ("V", "high"), "adenocarcinoma": ("V", "high"),
    }  # fmt: skip
