"""A result as FHIR R4 (4.0/4.3): a ``collection`` Bundle that says what it is.

* Before sign-out the ``DiagnosticReport`` is ``preliminary``: it carries the device's call as
  an ``Observation`` whose ``method`` and ``device`` say it was produced by the model (name,
  version, sha256) and is for research use only.  A failed or cancelled scan is ``cancelled``.
* After sign-out it is ``final``: the human verdict (Bethesda 2014, its Pap group and risk) is
  the ``conclusionCode``, in its own ``Observation``, and the signing user is the
  ``resultsInterpreter`` (a ``Practitioner``).  An amendment makes it ``amended``.
* ``Specimen.accessionIdentifier`` is the slide id; ``subject`` only when the result names a
  patient (``patient_id``, docs/collector.md).  No text carries a file path; an abstained
  slide carries no risk ``Observation``; a missing risk is never written as "None".

Codes are the product's own (``urn:omis:*``) beside LOINC 10524-7 (cervical/vaginal cytology)
and HL7's cytopathology section; map them in the LIMS.
"""

from __future__ import annotations

import re
import uuid
from typing import Any

from deploy.collector.bethesda import pap_class
from deploy.collector.review import report_status

SYSTEM = "urn:omis"
RUO = {
    "system": f"{SYSTEM}:intended-use",
    "code": "research-use-only",
    "display": "For research use only; not for diagnostic procedures",
}
REPORT_CODE = {
    "coding": [
        {
            "system": "http://loinc.org",
            "code": "10524-7",
            "display": "Microscopic observation [Identifier] in Cervical or vaginal smear or "
            "scraping by Cyto stain",
        },
        {"system": f"{SYSTEM}:code", "code": "omis-pap-screen", "display": "OMIS Pap screen"},
    ],
    "text": "Cervical cytology (OMIS Pap smear screening)",
}
# a path: /a/b, ./a, ~/a, C:\a, file://... at a word start (so "1/2" or "p(high)" stay)
_PATH = re.compile(r"(?:(?<=^)|(?<=[\s'\"=(\[<,;]))(?:file://|[A-Za-z]:\\|~/|\.{1,2}/|/)\S*")
_CODE = re.compile(r"^[a-z][a-z0-9_]{0,63}$")


def scrub(text: str) -> str:
    """``text`` with every file path replaced by ``<path>``."""
    return _PATH.sub("<path>", text)


def _concept(code: str, text: str, system: str = f"{SYSTEM}:code") -> dict[str, Any]:
    return {"coding": [{"system": system, "code": code, "display": text}], "text": text}


def _id(message_id: str, part: str) -> str:
    return str(uuid.uuid5(uuid.UUID(message_id), part))


def _ref(resource_id: str) -> dict[str, str]:
    return {"reference": f"urn:uuid:{resource_id}"}


def _model_label(model: dict[str, Any]) -> str:
    name = str(model.get("name") or "unnamed model")
    version = model.get("version")
    return name if version is None else f"{name} v{version}"


def _device_call_text(archive: dict[str, Any]) -> str:
    """The device's call in words (never 'None risk')."""
    kind, p = archive["outcome"], archive["p_high"]
    p_text = "" if p is None else f", p(high) {p:.2f}"
    if kind == "classified":
        risk = archive["risk"]
        return (f"{risk} risk" if risk in ("low", "high") else "classified") + p_text
    if kind == "abstained":
        reason = archive["outcome_reason"]
        why = f" ({reason})" if reason and _CODE.match(reason) else ""
        return f"abstained{why}: a person must review the slide{p_text}"
    if kind == "failed":
        stage = archive["outcome_stage"]
        where = f" at stage {stage}" if stage and _CODE.match(stage) else ""
        return f"scan failed{where}; rescan the slide"
    return "scan cancelled; no call"


def _conclusion(archive: dict[str, Any], verdict: dict[str, Any] | None) -> str:
    call = _device_call_text(archive)
    if verdict is None:
        return f"Preliminary, not signed out. Device triage: {call}. For research use only."
    category = verdict["bethesda"] or "no category"
    mapped = pap_class(verdict["bethesda"])
    group = "" if mapped is None else f", Pap group {mapped.pap_group}, {mapped.risk} risk"
    text = f"{category} (specimen {verdict['adequacy']}{group}); signed out by "
    return text + f"{verdict['user_name']} ({verdict['role']}). Device triage was: {call}."


class _Builder:
    """The resources of one bundle; ``add`` returns the new resource's id."""

    def __init__(self, stored: dict[str, Any], reviews: list[dict[str, Any]]) -> None:
        self.archive, self.result = stored["archive"], stored["result"]
        self.reviews = reviews
        self.verdict = reviews[-1] if reviews else None
        self.mid = self.archive["message_id"]
        self.resources: list[dict[str, Any]] = []

    def add(self, part: str, resource: dict[str, Any]) -> str:
        resource_id = _id(self.mid, part)
        self.resources.append({"id": resource_id, **resource})
        return resource_id

    def common(self) -> dict[str, Any]:
        refs: dict[str, Any] = {
            "specimen": _ref(_id(self.mid, "specimen")),
            "effectiveDateTime": self.archive["finished_at"],
        }
        subject = self.subject()
        if subject is not None:
            refs["subject"] = subject
        return refs

    def subject(self) -> dict[str, Any] | None:
        patient = self.result.get("patient_id")
        if not isinstance(patient, str) or not patient.strip():
            return None
        return {"identifier": {"system": f"{SYSTEM}:patient", "value": patient.strip()}}


def _devices(b: _Builder) -> None:
    archive, model = b.archive, b.result.get("model") or {}
    b.add(
        "device",
        {
            "resourceType": "Device",
            "identifier": [{"system": f"{SYSTEM}:device", "value": archive["device_id"]}],
            "deviceName": [{"name": archive["device_id"], "type": "user-friendly-name"}],
            "type": {"text": "OMIS microscope appliance"},
        },
    )
    b.add(
        "model",
        {
            "resourceType": "Device",
            "meta": {"tag": [RUO]},
            "identifier": [
                {"system": f"{SYSTEM}:model-sha256", "value": str(model.get("sha256") or "unknown")}
            ],
            "deviceName": [{"name": str(model.get("name") or "unnamed"), "type": "model-name"}],
            "type": {"text": "Machine-learning model (software as a medical device, research use)"},
            "version": [{"value": str(model.get("version", "unknown"))}],
            "note": [{"text": RUO["display"]}],
            "parent": _ref(_id(b.mid, "device")),
        },
    )


def _specimen(b: _Builder) -> None:
    specimen: dict[str, Any] = {
        "resourceType": "Specimen",
        "accessionIdentifier": {"system": f"{SYSTEM}:slide", "value": b.archive["slide_id"]},
        "identifier": [{"system": f"{SYSTEM}:slide", "value": b.archive["slide_id"]}],
        "type": {"text": "Cervical cytology slide (Pap smear)"},
    }
    subject = b.subject()
    if subject is not None:
        specimen["subject"] = subject
    b.add("specimen", specimen)


def _device_call(b: _Builder) -> str:
    """The model's call: outcome (and risk only when classified), marked as machine-made."""
    archive, model = b.archive, b.result.get("model") or {}
    kind = archive["outcome"]
    label = _model_label(model)
    sha = str(model.get("sha256") or "unknown")
    observation: dict[str, Any] = {
        "resourceType": "Observation",
        "meta": {"tag": [RUO]},
        "status": "cancelled" if kind in ("failed", "cancelled") else "preliminary",
        "code": _concept("device-call", "OMIS device triage call (AI)"),
        "method": {
            "coding": [
                {
                    "system": f"{SYSTEM}:method",
                    "code": "ml-model",
                    "display": "Produced by a machine-learning model",
                }
            ],
            "text": f"Produced by the model {label} (sha256 {sha}); research use only",
        },
        "device": _ref(_id(b.mid, "model")),
        "note": [{"text": scrub(_device_call_text(archive))}],
        **b.common(),
    }
    if kind == "classified" and archive["risk"] in ("low", "high"):
        risk = archive["risk"]
        observation["valueCodeableConcept"] = _concept(risk, f"{risk} risk", f"{SYSTEM}:risk")
    else:
        observation["valueCodeableConcept"] = _concept(kind, kind, f"{SYSTEM}:outcome")
    if archive["p_high"] is not None and kind in ("classified", "abstained"):
        observation["component"] = [
            {
                "code": _concept("p-high", "Probability of high-risk cytology (model output)"),
                "valueQuantity": {
                    "value": round(float(archive["p_high"]), 4),
                    "unit": "1",
                    "system": "http://unitsofmeasure.org",
                    "code": "1",
                },
            }
        ]
    return b.add("device-call", observation)


def _practitioner(b: _Builder, verdict: dict[str, Any]) -> str:
    name = verdict["user_name"]
    return b.add(
        f"practitioner:{name}",
        {
            "resourceType": "Practitioner",
            "identifier": [{"system": f"{SYSTEM}:user", "value": name}],
            "name": [{"text": name}],
        },
    )


def _verdict(b: _Builder, verdict: dict[str, Any], interpreter: str) -> str:
    category = verdict["bethesda"]
    mapped = pap_class(category)
    components: list[dict[str, Any]] = [
        {
            "code": _concept("adequacy", "Specimen adequacy"),
            "valueCodeableConcept": _concept(
                verdict["adequacy"], verdict["adequacy"], f"{SYSTEM}:adequacy"
            ),
        }
    ]
    if mapped is not None:
        components += [
            {
                "code": _concept("pap-group", "Pap group (Munich III)"),
                "valueCodeableConcept": _concept(
                    mapped.pap_group, f"group {mapped.pap_group}", f"{SYSTEM}:pap-group"
                ),
            },
            {
                "code": _concept("risk", "Risk class"),
                "valueCodeableConcept": _concept(
                    mapped.risk, f"{mapped.risk} risk", f"{SYSTEM}:risk"
                ),
            },
        ]
    observation: dict[str, Any] = {
        "resourceType": "Observation",
        "status": "final" if len(b.reviews) == 1 else "amended",
        "code": _concept("bethesda", "Cytology interpretation (The Bethesda System 2014)"),
        "performer": [_ref(interpreter)],
        "issued": verdict["created_at"],
        "component": components,
        **b.common(),
    }
    if category is not None:
        observation["valueCodeableConcept"] = _concept(category, category, f"{SYSTEM}:bethesda")
    else:
        observation["dataAbsentReason"] = {"text": "specimen unsatisfactory for evaluation"}
    if verdict.get("comment"):
        observation["note"] = [{"text": scrub(str(verdict["comment"]))}]
    return b.add(f"verdict:{verdict['id']}", observation)


def _report(b: _Builder, results: list[str], interpreter: str | None) -> dict[str, Any]:
    archive, verdict = b.archive, b.verdict
    status = report_status(b.reviews)
    if verdict is None and archive["outcome"] in ("failed", "cancelled"):
        status = "cancelled"
    report: dict[str, Any] = {
        "resourceType": "DiagnosticReport",
        "id": _id(b.mid, "report"),
        "meta": {"tag": [RUO]},
        "identifier": [{"system": "urn:ietf:rfc:3986", "value": f"urn:uuid:{b.mid}"}],
        "status": status,
        "category": [
            _concept("CP", "Cytopathology", "http://terminology.hl7.org/CodeSystem/v2-0074")
        ],
        "code": REPORT_CODE,
        "effectiveDateTime": archive["finished_at"],
        "issued": verdict["created_at"] if verdict else archive["received_at"],
        "specimen": [_ref(_id(b.mid, "specimen"))],
        "result": [_ref(r) for r in results],
        "conclusion": scrub(_conclusion(archive, verdict)),
    }
    subject = b.subject()
    if subject is not None:
        report["subject"] = subject
    if verdict is not None and interpreter is not None:
        report["resultsInterpreter"] = [_ref(interpreter)]
        if verdict["bethesda"] is not None:
            report["conclusionCode"] = [
                _concept(verdict["bethesda"], verdict["bethesda"], f"{SYSTEM}:bethesda")
            ]
    return report


def diagnostic_bundle(
    stored: dict[str, Any], reviews: list[dict[str, Any]] | None = None
) -> dict[str, Any]:
    """The FHIR ``Bundle`` for one stored result and its reviews (oldest first)."""
    b = _Builder(stored, reviews or [])
    _devices(b)
    _specimen(b)
    results = [_device_call(b)]
    interpreter = None
    if b.verdict is not None:
        interpreter = _practitioner(b, b.verdict)
        results.append(_verdict(b, b.verdict, interpreter))
    report = _report(b, results, interpreter)
    resources = [report, *b.resources]
    return {
        "resourceType": "Bundle",
        "id": report["id"],
        "type": "collection",
        "timestamp": report["issued"],
        "entry": [{"fullUrl": f"urn:uuid:{r['id']}", "resource": r} for r in resources],
    }
