"""The archive's side of shadow evaluation: store ``omis.shadow/1``, compare with serving.

:class:`ShadowArchive` stores each shadow result in ``shadow_results`` (never in ``results``:
a shadow call reaches no worklist, alert or FHIR report) and answers ``GET /api/shadow``:

* ``agreement``: share of slides where the candidate's call (its label, or ``abstained`` /
  ``failed``) equals the serving call, with a Wilson 95 % interval;
* ``referral``: share of slides each model refers to a person (a high-risk call or no call),
  and the paired discordant counts (candidate refers alone / serving refers alone) with the
  exact one-sided sign-test p-value that the candidate refers more;
* ``reviewed``: on slides with a reviewer's verdict (latest ``reviews`` row per serving
  message, Bethesda -> risk by :mod:`deploy.collector.bethesda`), sensitivity and specificity of
  the referral decision for both models, each with a Wilson 95 % interval;
* counts: shadow results, those paired with their serving result, by device and outcome.

:func:`judge` applies the documented promotion criterion (docs/fleet.md).
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError
from sqlalchemy import Engine, and_, func, inspect, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import SQLAlchemyError

from deploy.collector.bethesda import pap_class
from deploy.collector.store import parse_time, utcnow
from deploy.collector.tables import results, reviews, shadow_results
from deploy.exceptions import ArchiveError
from deploy.messages.shadow import ShadowMessage
from firmware_bridge.validation import first_error

log = logging.getLogger(__name__)

Z95 = 1.959963984540054
SHA256 = re.compile(r"^[0-9a-f]{64}$")
NAME_VERSION = re.compile(r"^(?P<name>[^:\x00-\x20\x7f]{1,128}):(?P<version>[0-9]{1,18})$")


def parse_shadow(device: str, data: Any) -> ShadowMessage:
    """A received shadow result, validated; ``ValueError`` naming the problem (one line).

    A message claiming another device than the topic it came on is refused.
    """
    try:
        message = ShadowMessage.model_validate(data)
    except ValidationError as exc:
        raise ValueError(f"omis.shadow/1: {first_error(exc)}") from None
    if message.device_id != device:
        raise ValueError(
            f"shadow result names device {message.device_id!r} but came on the topic of {device!r}"
        )
    return message


def _row(message: ShadowMessage, payload: str) -> dict[str, Any]:
    p = message.prediction
    return {
        "message_id": message.message_id,
        "serving_message_id": message.serving_message_id,
        "device_id": message.device_id,
        "slide_id": message.slide_id,
        "finished_at": parse_time(message.finished_at),
        "received_at": utcnow(),
        "candidate_name": message.candidate.name,
        "candidate_version": message.candidate.version,
        "candidate_sha256": message.candidate.sha256,
        "serving_sha256": message.serving.sha256,
        "outcome": message.outcome,
        "reason": message.reason,
        "label": p.label if p else None,
        "risk": p.risk if p else None,
        "p_high": p.p_high if p else None,
        "serving_outcome": message.serving_outcome,
        "serving_label": message.serving_label,
        "payload": payload,
    }


def wilson(k: int, n: int) -> list[float] | None:
    """Wilson score 95 % interval of ``k`` successes in ``n`` (None when ``n`` is 0)."""
    if n <= 0:
        return None
    p = k / n
    denom = 1 + Z95**2 / n
    centre = (p + Z95**2 / (2 * n)) / denom
    half = Z95 * math.sqrt(p * (1 - p) / n + Z95**2 / (4 * n * n)) / denom
    return [round(max(0.0, centre - half), 6), round(min(1.0, centre + half), 6)]


def sign_test_p(more: int, fewer: int) -> float:
    """One-sided exact sign test: P(X >= more) for X ~ Bin(more + fewer, 1/2)."""
    n = more + fewer
    if n == 0:
        return 1.0
    return min(1.0, sum(math.comb(n, i) for i in range(more, n + 1)) / 2.0**n)


def _rate(k: int, n: int) -> dict[str, Any]:
    return {"k": k, "n": n, "rate": round(k / n, 6) if n else None, "ci95": wilson(k, n)}


def _refers(outcome: str | None, risk: str | None) -> bool:
    """A person looks at the slide: a high-risk call, or no call at all."""
    return outcome != "classified" or risk == "high"


def _call(outcome: str | None, label: str | None) -> str:
    return label if outcome == "classified" and label is not None else str(outcome)


@dataclass(frozen=True)
class _Pair:
    device: str
    outcome: str
    label: str | None
    risk: str | None
    serving_outcome: str | None  # None: the serving result is not in the archive (yet)
    serving_label: str | None
    serving_risk: str | None
    truth: str | None  # reviewed risk


class ShadowArchive:
    """Shadow results in the archive database."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def add(self, device: str, payload: bytes) -> bool:
        """Store one shadow result from ``<prefix>/<device>/shadow``; False for a redelivery.

        Raises ``ValueError`` for a malformed message or one claiming another device, and
        :class:`ArchiveError` when the database fails.
        """
        text = payload.decode("utf-8")
        return self.store(parse_shadow(device, json.loads(text)), text)

    def store(self, message: ShadowMessage, text: str) -> bool:
        """Store a parsed shadow result (``text``: its payload); False for a redelivery."""
        row = _row(message, text)
        dialect = postgresql if self.engine.dialect.name == "postgresql" else sqlite
        stmt = dialect.insert(shadow_results).values(**row)
        stmt = stmt.on_conflict_do_nothing(index_elements=["message_id"])
        try:
            with self.engine.begin() as conn:
                stored = conn.execute(stmt.returning(shadow_results.c.id)).first() is not None
        except SQLAlchemyError as exc:
            raise ArchiveError(f"cannot store shadow result {message.message_id}: {exc}") from exc
        return stored

    # -- comparison ------------------------------------------------------------------------

    def _candidate_filter(self, candidate: str) -> Any:
        if SHA256.match(candidate):
            return shadow_results.c.candidate_sha256 == candidate
        m = NAME_VERSION.match(candidate)
        if m is None:
            raise ValueError("candidate: a model sha256 (64 hex digits) or name:version")
        return and_(
            shadow_results.c.candidate_name == m["name"],
            shadow_results.c.candidate_version == int(m["version"]),
        )

    def _pairs(self, candidate: str, devices: list[str] | None) -> list[_Pair]:
        s, r = shadow_results, results
        cols = [
            s.c.device_id,
            s.c.outcome,
            s.c.label,
            s.c.risk,
            r.c.outcome,
            r.c.label,
            r.c.risk,
            s.c.serving_message_id,
        ]
        query = (
            select(*cols)
            .select_from(s.outerjoin(r, r.c.message_id == s.c.serving_message_id))
            .where(self._candidate_filter(candidate))
        )
        if devices:
            query = query.where(s.c.device_id.in_(devices))
        try:
            with self.engine.connect() as conn:
                rows = conn.execute(query).all()
                verdicts = self._verdicts(conn, [row[7] for row in rows])
        except SQLAlchemyError as exc:
            raise ArchiveError(f"cannot read shadow results: {exc}") from exc
        return [
            _Pair(row[0], row[1], row[2], row[3], row[4], row[5], row[6], verdicts.get(row[7]))
            for row in rows
        ]

    def _verdicts(self, conn: Any, message_ids: list[str]) -> dict[str, str]:
        """Reviewed risk per serving message (latest review row); empty without a reviews
        table (the archive of a branch without reviews)."""
        if not message_ids or not inspect(conn).has_table("reviews"):
            return {}
        latest = (
            select(func.max(reviews.c.id))
            .where(reviews.c.message_id.in_(message_ids))
            .group_by(reviews.c.message_id)
        )
        rows = conn.execute(
            select(reviews.c.message_id, reviews.c.bethesda).where(reviews.c.id.in_(latest))
        ).all()
        out: dict[str, str] = {}
        for message_id, bethesda in rows:
            try:
                mapped = pap_class(bethesda)
            except ValueError:
                continue
            if mapped is not None:
                out[message_id] = mapped.risk
        return out

    def compare(self, candidate: str, devices: list[str] | None = None) -> dict[str, Any]:
        """The comparison of ``candidate`` (sha256 or ``name:version``) with serving."""
        pairs = self._pairs(candidate, devices)
        paired = [p for p in pairs if p.serving_outcome is not None]
        agree = sum(
            _call(p.outcome, p.label) == _call(p.serving_outcome, p.serving_label) for p in paired
        )
        cand_refers = [_refers(p.outcome, p.risk) for p in paired]
        serv_refers = [_refers(p.serving_outcome, p.serving_risk) for p in paired]
        more = sum(c and not s for c, s in zip(cand_refers, serv_refers, strict=True))
        fewer = sum(s and not c for c, s in zip(cand_refers, serv_refers, strict=True))
        by_device: dict[str, int] = {}
        outcomes: dict[str, int] = {}
        for p in pairs:
            by_device[p.device] = by_device.get(p.device, 0) + 1
            outcomes[p.outcome] = outcomes.get(p.outcome, 0) + 1
        return {
            "candidate": candidate,
            "counts": {
                "shadow_results": len(pairs),
                "paired": len(paired),
                "by_device": by_device,
                "outcomes": outcomes,
            },
            "agreement": _rate(agree, len(paired)),
            "referral": {
                "candidate": _rate(sum(cand_refers), len(paired)),
                "serving": _rate(sum(serv_refers), len(paired)),
                "candidate_only": more,
                "serving_only": fewer,
                "p_candidate_refers_more": round(sign_test_p(more, fewer), 6),
            },
            "reviewed": self._reviewed(paired),
        }

    @staticmethod
    def _reviewed(paired: list[_Pair]) -> dict[str, Any]:
        reviewed = [p for p in paired if p.truth is not None]
        high = [p for p in reviewed if p.truth == "high"]
        low = [p for p in reviewed if p.truth == "low"]

        def perf(refers: Any) -> dict[str, Any]:
            return {
                "sensitivity": _rate(sum(refers(p) for p in high), len(high)),
                "specificity": _rate(sum(not refers(p) for p in low), len(low)),
            }

        return {
            "slides": len(reviewed),
            "high": len(high),
            "low": len(low),
            "candidate": perf(lambda p: _refers(p.outcome, p.risk)),
            "serving": perf(lambda p: _refers(p.serving_outcome, p.serving_risk)),
        }


@dataclass(frozen=True)
class Criterion:
    """When a shadow comparison lets a candidate be promoted (docs/fleet.md)."""

    min_slides: int = 20
    min_agreement: float = 0.8
    alpha: float = 0.05


def judge(comparison: dict[str, Any], criterion: Criterion) -> tuple[bool, str]:
    """``(passed, why)`` of a comparison (of the slides of one device or several)."""
    counts = comparison["counts"]
    if counts["paired"] < criterion.min_slides:
        return False, f"{counts['paired']} of {criterion.min_slides} compared slides"
    failed = counts["outcomes"].get("failed", 0)
    if failed:
        return False, f"the candidate failed on {failed} slide(s)"
    agreement = comparison["agreement"]["rate"]
    if agreement < criterion.min_agreement:
        return False, f"agreement {agreement:.3f} is below {criterion.min_agreement}"
    ref = comparison["referral"]
    if ref["p_candidate_refers_more"] < criterion.alpha:
        return False, (
            f"the candidate refers significantly more slides ({ref['candidate']['rate']:.3f} vs "
            f"{ref['serving']['rate']:.3f}, p={ref['p_candidate_refers_more']:.4f})"
        )
    worse = _worse_on_reviewed(comparison["reviewed"])
    if worse:
        return False, worse
    return True, (
        f"{counts['paired']} slides: agreement {agreement:.3f}, referral "
        f"{ref['candidate']['rate']:.3f} vs {ref['serving']['rate']:.3f}"
    )


def _worse_on_reviewed(reviewed: dict[str, Any]) -> str | None:
    """Reviewed slides: the candidate's sensitivity may not be lower than serving's, and its
    specificity may not be significantly lower (its 95 % interval wholly below serving's)."""
    cand, serv = reviewed["candidate"], reviewed["serving"]
    cs, ss = cand["sensitivity"]["rate"], serv["sensitivity"]["rate"]
    if cs is not None and ss is not None and cs < ss:
        return f"sensitivity on reviewed slides {cs:.3f} is below serving's {ss:.3f}"
    ci, si = cand["specificity"]["ci95"], serv["specificity"]["ci95"]
    if ci is not None and si is not None and ci[1] < si[0]:
        return (
            f"specificity on reviewed slides {cand['specificity']['rate']:.3f} is significantly "
            f"below serving's {serv['specificity']['rate']:.3f}"
        )
    return None
