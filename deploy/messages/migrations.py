"""Older ``omis.result/1`` payloads upgraded to the current format by one chain of small steps.

A fleet mid-upgrade sends results from several app versions.  Like Frigate's config migrations,
each step turns format N into N+1 and nothing else; :func:`upgrade_result` detects the format and
runs the steps after it, in order, so every format reaches the current one by the same path.

======  ======================================================================================
format  shape
======  ======================================================================================
1       no ``outcome``: ``prediction.abstained`` (and ``prediction.reason``) say it all
2       ``outcome``/``reason``/``stage`` at the top; ``prediction.label`` is the arg-max class
3       (current, ``format: 3``) ``prediction.label`` is the decision, ``argmax_label`` the
        arg-max; an undecided slide has no label or risk but ``side`` (and ``band`` when known)
======  ======================================================================================

A step only moves and derives keys; validation happens afterwards, against the current model.

``status`` and ``ota/state`` have no chain (yet): every change to them so far only added optional
keys (``shadow``, ``progress``, ``generation``, ...), which their models default, so a document of
an earlier app version validates as it is and is stored in the current shape.  A change that
makes a key required, or renames one, gets a step here, as for results.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from inference.result import AbstainReason

CURRENT_FORMAT = 3
#: The risk of each Pap group (the product's mapping; training.data's pap4 task uses it too).
PAP_RISK = {"II": "low", "III": "low", "IV": "high", "V": "high", "low": "low", "high": "high"}

Step = Callable[[dict[str, Any]], dict[str, Any]]


def _prediction(data: dict[str, Any]) -> dict[str, Any]:
    prediction = data.get("prediction")
    if not isinstance(prediction, dict):
        raise ValueError("result: prediction: not a JSON object")
    return dict(prediction)


def _outcome_in_prediction(data: dict[str, Any]) -> dict[str, Any]:
    """1 -> 2: the outcome moves out of ``prediction`` to the top level."""
    prediction = _prediction(data)
    stated = prediction.pop("reason", None)
    if prediction.get("abstained"):
        known = {r.value for r in AbstainReason}
        reason = stated if stated in known else AbstainReason.UNCERTAIN_PROBABILITY.value
        data.update(outcome="abstained", reason=reason)
    else:
        data["outcome"] = "classified"
    data.setdefault("source", "cli")  # format 1 did not always say; cli is what sent it
    data["prediction"] = prediction
    return data


def _decided_label(prediction: dict[str, Any], risk: str) -> str | None:
    probabilities = prediction.get("probabilities") or {}
    if set(probabilities) <= set(PAP_RISK) and probabilities:
        side = {c: p for c, p in probabilities.items() if PAP_RISK[c] == risk}
        if side:
            return max(side, key=lambda c: side[c])  # type: ignore[no-any-return]
    label = prediction.get("label")
    return label if isinstance(label, str) else None  # unknown classes: the old label stays


def _one_call(data: dict[str, Any]) -> dict[str, Any]:
    """2 -> 3: ``label`` becomes the decision; an undecided slide states its side instead."""
    prediction = _prediction(data)
    argmax, risk = prediction.get("label"), prediction.get("risk")
    prediction["argmax_label"] = argmax
    if data.get("outcome") == "classified" and isinstance(risk, str):
        prediction["label"] = _decided_label(prediction, risk)
    else:
        if data.get("outcome") == "abstained" and risk in ("low", "high"):
            prediction["side"] = risk  # format 2's risk of an abstained slide was its leaning
        prediction.update(label=None, risk=None)
    data["prediction"] = prediction
    data["format"] = 3
    return data


#: (format a step upgrades from, the step), oldest first.
MIGRATIONS: tuple[tuple[int, Step], ...] = ((1, _outcome_in_prediction), (2, _one_call))


def format_of(data: dict[str, Any]) -> int:
    """The payload format: stated, or recognised by its shape."""
    stated = data.get("format")
    if stated is not None:
        if type(stated) is not int or not 1 <= stated <= CURRENT_FORMAT:
            raise ValueError(f"result: format: unknown format {stated!r}")
        return stated
    return 2 if "outcome" in data else 1


def upgrade_result(data: Any) -> dict[str, Any]:
    """``data`` in the current format (a new dict; the input is not changed)."""
    if not isinstance(data, dict):
        raise ValueError("result: not a JSON object")
    version = format_of(data)
    out = dict(data)
    for source, step in MIGRATIONS:
        if version == source:
            out = step(out)
            version = source + 1
    return out
