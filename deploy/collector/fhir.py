"""A result as FHIR R4 (4.0/4.3): a ``Bundle`` (collection) of a ``DiagnosticReport``, its
``Observation``s, the ``Specimen`` (the slide) and two ``Device``s (the appliance, the model).

The report says the outcome (``final`` when classified, ``preliminary`` when it needs review,
``cancelled`` when the scan failed or was cancelled), p(high), the risk class, the review flag
with its reason, and the model's name, version and sha256.  Codes are the product's own
(``urn:omis:*``) beside HL7's cytopathology service section; map them to LOINC in the LIMS.
"""

from __future__ import annotations

import uuid
from typing import Any

from deploy.messages.vocabulary import Outcome

SYSTEM = "urn:omis"
REPORT_STATUS = {
    Outcome.CLASSIFIED.value: "final",
    Outcome.ABSTAINED.value: "preliminary",
    Outcome.FAILED.value: "cancelled",
    Outcome.CANCELLED.value: "cancelled",
}


def _concept(code: str, text: str, system: str = f"{SYSTEM}:code") -> dict[str, Any]:
    return {"coding": [{"system": system, "code": code, "display": text}], "text": text}


def _id(message_id: str, part: str) -> str:
    return str(uuid.uuid5(uuid.UUID(message_id), part))


def _observation(
    message_id: str, code: str, text: str, value: dict[str, Any], *, refs: dict[str, Any]
) -> dict[str, Any]:
    return {
        "resourceType": "Observation",
        "id": _id(message_id, code),
        "status": "final",
        "code": _concept(code, text),
        **refs,
        **value,
    }


def _conclusion(archive: dict[str, Any]) -> str:
    kind = archive["outcome"]
    if kind == Outcome.CLASSIFIED.value:  # the decision: label and risk are the same call
        p = archive["p_high"]
        return f"{archive['risk']} risk" + (f" (p(high) {p:.3f})" if p is not None else "")
    if kind == Outcome.FAILED.value and archive["outcome_stage"]:
        return f"failed at {archive['outcome_stage']}: {archive['outcome_reason']}"
    return f"{kind}: {archive['outcome_reason']}" if archive["outcome_reason"] else kind


def diagnostic_bundle(stored: dict[str, Any]) -> dict[str, Any]:
    """The FHIR ``Bundle`` for one stored result (``ArchiveQueries.get_result``'s shape)."""
    archive, result = stored["archive"], stored["result"]
    mid = archive["message_id"]
    ids = {k: _id(mid, k) for k in ("report", "specimen", "device", "model")}
    refs = {
        "specimen": {"reference": f"urn:uuid:{ids['specimen']}"},
        "device": {"reference": f"urn:uuid:{ids['device']}"},
        "effectiveDateTime": archive["finished_at"],
        "issued": archive["received_at"],
    }
    observations = [
        _observation(
            mid,
            "outcome",
            "OMIS outcome",
            {
                "valueCodeableConcept": _concept(
                    archive["outcome"], archive["outcome"], f"{SYSTEM}:outcome"
                ),
                **(
                    {"note": [{"text": archive["outcome_reason"]}]}
                    if archive["outcome_reason"]
                    else {}
                ),
            },
            refs=refs,
        ),
        _observation(
            mid,
            "review",
            "Needs review by a cytologist",
            {"valueBoolean": bool(archive["review"])},
            refs=refs,
        ),
    ]
    if archive["p_high"] is not None:
        value = {
            "value": archive["p_high"],
            "unit": "1",
            "system": "http://unitsofmeasure.org",
            "code": "1",
        }
        observations.append(
            _observation(
                mid,
                "p-high",
                "Probability of high-risk cytology",
                {"valueQuantity": value},
                refs=refs,
            )
        )
    if archive["risk"]:
        concept = _concept(archive["risk"], f"{archive['risk']} risk", f"{SYSTEM}:risk")
        observations.append(
            _observation(
                mid, "risk", "OMIS risk class", {"valueCodeableConcept": concept}, refs=refs
            )
        )
    model = result.get("model") or {}
    resources: list[dict[str, Any]] = [
        {
            "resourceType": "DiagnosticReport",
            "id": ids["report"],
            "identifier": [{"system": "urn:ietf:rfc:3986", "value": f"urn:uuid:{mid}"}],
            "status": REPORT_STATUS[archive["outcome"]],
            "category": [
                _concept("CP", "Cytopathology", "http://terminology.hl7.org/CodeSystem/v2-0074")
            ],
            "code": _concept("omis-pap-screen", "OMIS Pap smear screening"),
            "effectiveDateTime": archive["finished_at"],
            "issued": archive["received_at"],
            "specimen": [refs["specimen"]],
            "result": [{"reference": f"urn:uuid:{o['id']}"} for o in observations],
            "conclusion": _conclusion(archive),
        },
        *observations,
        {
            "resourceType": "Specimen",
            "id": ids["specimen"],
            "identifier": [{"system": f"{SYSTEM}:slide", "value": archive["slide_id"]}],
        },
        {
            "resourceType": "Device",
            "id": ids["device"],
            "identifier": [{"system": f"{SYSTEM}:device", "value": archive["device_id"]}],
            "deviceName": [{"name": archive["device_id"], "type": "user-friendly-name"}],
        },
        {
            "resourceType": "Device",
            "id": ids["model"],
            "identifier": [
                {"system": f"{SYSTEM}:model-sha256", "value": str(model.get("sha256", ""))}
            ],
            "deviceName": [{"name": str(model.get("name", "")), "type": "model-name"}],
            "version": [{"value": str(model.get("version", ""))}],
            "parent": refs["device"],
        },
    ]
    return {
        "resourceType": "Bundle",
        "id": ids["report"],
        "type": "collection",
        "timestamp": archive["received_at"],
        "entry": [{"fullUrl": f"urn:uuid:{r['id']}", "resource": r} for r in resources],
    }
