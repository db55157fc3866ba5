"""Builders of valid messages for tests, benchmarks and demos: the product's own code paths.

A result is built the way the device builds it: the decision rule
(:func:`inference.decision.decide`) turns probabilities into a call, the report constructors of
:mod:`inference.result` make the slide's report, and :func:`deploy.appliance.results.build_result`
wraps it.  Nothing here writes a result dict by hand, so a test payload is valid exactly when the
device's would be, and follows the contract when it changes.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from typing import Any

from deploy.appliance.base import ScanRequest
from deploy.appliance.results import Identity, build_result
from deploy.messages.ota_state import OtaStateMessage
from deploy.messages.reply import ReplyMessage
from deploy.messages.result import ResultMessage
from deploy.messages.status import StatusMessage
from inference.decision import Limits, decide
from inference.result import (
    FieldReport,
    ModelRef,
    Outcome,
    Simulation,
    SlideReport,
    SpectrumReport,
    Stage,
    cancelled,
    failed,
    no_usable_field,
)

SHA = "ab" * 32
MODEL = {"name": "omis-test", "version": 4, "sha256": SHA}
BACKEND = {"name": "onnxruntime", "precision": "fp32"}
BINARY_RISK = {"low": "low", "high": "high"}
DEFAULT_BAND = (0.35, 0.65)


def _limits(p_high: float, abstained: bool, decision: float) -> Limits:
    """Limits under which ``p_high`` is (or is not) inside the abstain band."""
    if not abstained and p_high == decision:
        decision = max(0.0, decision - 1e-6)  # p == decision would be inside any band
    lo, hi = min(DEFAULT_BAND[0], decision), max(DEFAULT_BAND[1], decision)
    inside = lo <= p_high <= hi
    if abstained and not inside:
        lo, hi = min(lo, p_high), max(hi, p_high)
    elif not abstained and inside:
        lo = hi = decision  # a degenerate band: only p == decision abstains
    return Limits(decision=decision, band=(lo, hi))


def _fields(fields: Sequence[Mapping[str, Any]] | None) -> list[FieldReport]:
    if fields is None:
        return [FieldReport(index=0, valid_fraction=0.9, quality="ok")]
    return [FieldReport.model_validate(dict(f)) for f in fields]


def classified_report(
    p_high: float = 0.2,
    *,
    abstained: bool = False,
    decision: float = 0.5,
    model: Mapping[str, Any] | None = None,
    backend: Mapping[str, Any] | None = None,
    fields: Sequence[Mapping[str, Any]] | None = None,
    axis: Sequence[float] = (-2.0, 0.0, 2.0),
    values: Sequence[float] = (0.1, 0.5, 0.1),
    timings_ms: Mapping[str, float] | None = None,
) -> SlideReport:
    """A binary-task slide the model ran on: classified, or abstained (uncertain)."""
    call = decide(
        ("low", "high"),
        (round(1.0 - p_high, 6), p_high),
        BINARY_RISK,
        _limits(p_high, abstained, decision),
    )
    return SlideReport(
        outcome=Outcome.ABSTAINED if call.reason else Outcome.CLASSIFIED,
        reason=call.reason.value if call.reason else None,
        reason_text=call.reason_text,
        details=list(call.details),
        model=ModelRef.model_validate(dict(model or MODEL)),
        backend=dict(backend or BACKEND),
        prediction=call.prediction,
        fields=_fields(fields),
        spectrum=SpectrumReport(algorithm="omis-wdiff-v1", axis=list(axis), values=list(values)),
        timings_ms=dict(timings_ms or {"total": 12.0}),
    )


def outcome_report(
    outcome: str, reason: str | None = None, stage: str | None = None, **kw: Any
) -> SlideReport:
    """A slide report for ``outcome`` (``classified``/``abstained``/``failed``/``cancelled``)."""
    model = kw.pop("model", MODEL)
    if outcome == "failed":
        return failed(Stage(stage or "internal"), reason or "test failure", model=model)
    if outcome == "cancelled":
        return cancelled(reason or "cancelled by cmd/cancel", model=model)
    if outcome == "abstained" and reason == "no_usable_field":
        bad = [{"index": 0, "valid_fraction": 0.0, "quality": "reject", "reasons": ["dark"]}]
        return no_usable_field(model, BACKEND, "omis-wdiff-v1", _fields(bad), {"total": 5.0})
    return classified_report(abstained=outcome == "abstained", model=model, **kw)


def result_message(
    seq: int = 1,
    *,
    device: str = "scope-07",
    boot: str = "boot-1",
    slide: str | None = None,
    scan: str | None = None,
    report: SlideReport | None = None,
    outcome: str | None = None,
    reason: str | None = None,
    stage: str | None = None,
    p_high: float = 0.2,
    abstained: bool = False,
    started_at: str = "2026-01-01T11:59:58.000Z",
    finished_at: str = "2026-01-01T12:00:00.000Z",
    source: str = "mqtt",
    simulation: Mapping[str, Any] | None = None,
    message_id: str | None = None,
    **report_kw: Any,
) -> ResultMessage:
    """A valid ``omis.result/1`` built through the device's code (see the module docstring)."""
    if report is None:
        kind = outcome or ("abstained" if abstained else "classified")
        report = outcome_report(kind, reason, stage, p_high=p_high, **report_kw)
    if simulation is not None:
        report = report.with_context(None, Simulation.model_validate(dict(simulation)))
    message = build_result(
        Identity(device, boot),
        seq=seq,
        request=ScanRequest(
            slide or f"S-{seq:04d}",
            1,
            source=source,  # type: ignore[arg-type]
            scan_id=scan or f"scan-{seq}",
        ),
        started_at=started_at,
        finished_at=finished_at,
        report=report,
    )
    if message_id is not None:
        message = ResultMessage.model_validate({**message.to_json(), "message_id": message_id})
    return message


def result_json(seq: int = 1, **kw: Any) -> dict[str, Any]:
    """:func:`result_message` as JSON data (what goes on the wire)."""
    return result_message(seq, **kw).to_json()


def new_message_id() -> str:
    """A fresh message id."""
    return str(uuid.uuid4())


def status_message(
    state: str = "idle", *, device: str = "scope-07", **changes: Any
) -> StatusMessage:
    """A valid ``omis.status/1`` of an idle device serving :data:`MODEL` (``changes`` replace
    top-level keys, by their JSON names)."""
    data: dict[str, Any] = {
        "device_id": device,
        "state": state,
        "reasons": [],
        "boot_id": "boot-1",
        "app_version": "0.1.0",
        "model": dict(MODEL),
        "engine": dict(BACKEND),
        "firmware": None,
        "queue": {"depth": 0, "capacity": 8},
        "outbox": {"rows": 0, "bytes": 0, "full": False},
        "last_error": None,
        "at": "2026-01-01T12:00:00.000Z",
    }
    return StatusMessage.model_validate({**data, **changes})


def ota_state_message(
    current: int | None = 1,
    previous: int | None = None,
    pending: int | None = None,
    **changes: Any,
) -> OtaStateMessage:
    """A valid ``omis.ota_state/1`` (``changes``: ``last_outcome``, ``progress``, ...)."""
    data = {"current": current, "previous": previous, "pending": pending, "last_outcome": None}
    return OtaStateMessage.model_validate({**data, **changes})


def reply_message(
    verb: str = "ota",
    correlation_id: str | None = "c-1",
    *,
    device: str = "scope-07",
    result: Mapping[str, Any] | None = None,
    error: Mapping[str, str] | None = None,
) -> ReplyMessage:
    """A valid ``omis.reply/1``: ``error`` ({code, message}) refuses, otherwise ok."""
    return ReplyMessage.model_validate(
        {
            "device_id": device,
            "verb": verb,
            "correlation_id": correlation_id,
            "ok": error is None,
            "result": dict(result or {}) if error is None else None,
            "error": dict(error) if error is not None else None,
            "at": "2026-01-01T12:00:00.000Z",
        }
    )
