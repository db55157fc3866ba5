"""What one slide produces, typed: the body of every ``omis.result/1`` message.

:class:`SlideReport` is built by the device pipeline (:meth:`inference.pipeline.SlideResult.report`)
or, when no classification came out, by :func:`no_usable_field`, :func:`failed` and
:func:`cancelled`; the appliance wraps it in the message envelope
(:class:`deploy.messages.result.ResultMessage`) and the shipped ``result.json`` schema is
generated from that envelope.  The outcome vocabulary (:class:`Outcome`, :class:`AbstainReason`,
:class:`Stage`, :data:`Risk`) is defined here, once, because the device pipeline builds it and
may not import ``deploy``; :mod:`deploy.messages.vocabulary` re-exports it for everything
else.  Every slide ends in exactly one :class:`Outcome`:

* ``classified``: a call was made (``prediction.label`` is the decision, see
  :mod:`inference.decision`; ``prediction.abstained`` false);
* ``abstained``: no decision, ``reason`` from :class:`AbstainReason`;
* ``failed``: the device path broke, ``stage`` from :class:`Stage` and a human ``reason``;
* ``cancelled``: the scan was cancelled (``cmd/cancel``, shutdown), ``reason`` says how.

``prediction.abstained`` is true for every outcome but ``classified``, so consumers that only
know ``omis.result/1``'s ``prediction`` never take an undecided slide for a decided one.
Numbers are finite: the models reject NaN and infinities and :func:`strict_json` refuses them.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from enum import Enum
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from inference.exceptions import (
    BackendUnavailableError,
    BundleError,
    EngineError,
    GoldenMismatchError,
    SpectrumInputError,
)

Finite = Annotated[float, Field(allow_inf_nan=False)]


def _no_nul(value: str) -> str:
    # PostgreSQL text cannot hold NUL; a payload carrying one could never be archived.
    if "\x00" in value:
        raise ValueError("contains a NUL character")
    return value


#: A string without NUL characters (storable in every database the archive supports).
Text = Annotated[str, AfterValidator(_no_nul)]
Fraction = Annotated[float, Field(ge=0.0, le=1.0, allow_inf_nan=False)]
Milliseconds = Annotated[float, Field(ge=0.0, allow_inf_nan=False)]
MAX_REASON = 500
MAX_INT64 = 2**63 - 1  # what BIGINT columns hold


class Outcome(str, Enum):
    """How a slide ended."""

    CLASSIFIED = "classified"
    ABSTAINED = "abstained"
    FAILED = "failed"
    CANCELLED = "cancelled"


class AbstainReason(str, Enum):
    """Why no label was decided (``reason`` of an ``abstained`` slide)."""

    UNCERTAIN_PROBABILITY = "uncertain_probability"  # p(high) inside the bundle's abstain band
    NO_USABLE_FIELD = "no_usable_field"  # no field passed quality control
    INSUFFICIENT_FIELDS = "insufficient_fields"  # fewer than scan.min_usable_fields passed QC
    OUT_OF_RANGE = "out_of_range"  # the input is outside what the model was trained on


#: The two sides of the decision threshold: a classified slide's risk, an abstained one's side.
Risk = Literal["low", "high"]
RISKS: tuple[Risk, ...] = ("low", "high")


class Stage(str, Enum):
    """Where the device path broke (``stage`` of a ``failed`` slide)."""

    ACQUIRE = "acquire"  # microscope, firmware, camera
    QC = "qc"
    SPECTRUM = "spectrum"
    RENDER = "render"
    PREPROCESS = "preprocess"
    INFER = "infer"
    MODEL = "model"  # the serving model could not be loaded or switched
    INTERNAL = "internal"  # anything else (a defect)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class ModelRef(_Strict):
    """The model that produced the result."""

    name: Text = Field(min_length=1, max_length=128)
    version: int = Field(ge=0, le=MAX_INT64, strict=True)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


_RELATION = {"<": "is below the minimum", ">": "is above the maximum", "in": "lies inside"}


class Measure(_Strict):
    """A measured value and the limit it was held against: why a check failed or a slide was
    abstained.  ``op`` is the relation that triggered it (``value < limit``, ``value > limit``,
    ``value in [lo, hi]``); ``text`` says the same for a person."""

    code: str = Field(max_length=64, description="the reason code this measure explains")
    measure: str = Field(max_length=64, description="what was measured (p_high, focus, ...)")
    value: Finite
    op: Literal["<", ">", "in"]
    limit: Finite | tuple[Finite, Finite]
    text: str = Field(max_length=MAX_REASON)


def measure(code: str, name: str, value: float, op: Literal["<", ">", "in"], limit: Any) -> Measure:
    """A :class:`Measure` with its readable text (``focus 0.0021 is below the minimum 0.004``)."""
    if op == "in":
        lo, hi = (float(v) for v in limit)
        bound: float | tuple[float, float] = (lo, hi)
        shown = f"the band [{lo:.4g}, {hi:.4g}]"
    else:
        bound = float(limit)
        shown = f"{bound:.4g}"
    text = f"{name} {float(value):.4g} {_RELATION[op]} {shown}"
    return Measure(code=code, measure=name, value=float(value), op=op, limit=bound, text=text)


class Prediction(_Strict):
    """The call.  ``label`` is the decision: the class chosen by the bundle's decision rule
    (p(high) >= ``thresholds.decision`` picks the high side, then the most probable class on
    that side; for the binary task ``label`` equals ``risk``).  ``argmax_label`` is the most
    probable class regardless of the threshold.  An undecided slide has no label and no risk;
    when p(high) is known it states ``side`` (where p(high) falls relative to the decision
    threshold) and ``band`` (the abstain band it fell in)."""

    label: Text | None = Field(max_length=64, description="the decision (None when undecided)")
    probabilities: dict[str, Fraction]
    risk: Risk | None = Field(description="the decided risk (None when undecided)")
    abstained: bool
    p_high: Fraction | None = None
    argmax_label: Text | None = Field(
        default=None, max_length=64, description="the most probable class (not the call)"
    )
    decision: Fraction | None = Field(default=None, description="the decision threshold on p_high")
    side: Risk | None = Field(
        default=None, description="undecided: the side of the decision threshold p_high lies on"
    )
    band: tuple[Fraction, Fraction] | None = Field(
        default=None, description="the abstain band [low, high] of the bundle"
    )

    @model_validator(mode="after")
    def _one_call(self) -> Prediction:
        if self.abstained and (self.label is not None or self.risk is not None):
            raise ValueError("an undecided prediction has no label and no risk (see side)")
        if not self.abstained and (self.label is None or self.risk is None):
            raise ValueError("a decided prediction has a label and a risk")
        binary = set(self.probabilities) == set(RISKS)
        if binary and self.label is not None and self.label != self.risk:
            raise ValueError(f"label {self.label!r} is not the decision (risk {self.risk!r})")
        if self.p_high is not None and self.decision is not None:
            lean: Risk = "high" if self.p_high >= self.decision else "low"
            if (self.risk or lean) != lean or (self.side or lean) != lean:
                raise ValueError(f"p_high {self.p_high} against decision {self.decision} is {lean}")
        return self


class FieldReport(_Strict):
    """One field's quality verdict, with the measure and limit behind each failed check."""

    index: int = Field(ge=0)
    valid_fraction: Fraction
    quality: str
    reasons: list[str] = Field(default_factory=list)
    checks: list[Measure] = Field(default_factory=list)


class SpectrumReport(_Strict):
    """The slide spectrum the model saw (empty when there was none)."""

    algorithm: str | None
    axis: list[Finite]
    values: list[Finite]
    flags: list[str] = Field(default_factory=list)
    mass_outside_window: Fraction | None = Field(
        default=None,
        description="fraction of the spectrum's absolute mass outside the model's render window; "
        "above the bundle's thresholds.out_of_range the slide is abstained (out_of_range)",
    )


class Simulation(_Strict):
    """Ground truth of a simulated slide."""

    pap_group: str | int
    slide_seed: int | None = None


class PlanRecord(_Strict):
    """The field layout a slide was scanned with (a named plan of ``scan.plans``)."""

    name: str
    pattern: str
    fields: int = Field(ge=1)
    origin_um: tuple[Finite, Finite]
    step_um: tuple[Finite, Finite]
    columns: int | None = None
    z_um: Finite = 0.0


class Recipe(_Strict):
    """How the slide was scanned, saved beside its result."""

    plan: PlanRecord


NO_PREDICTION = Prediction(label=None, probabilities={}, risk=None, abstained=True)


class SlideReport(_Strict):
    """Everything one slide produced, from the pipeline to the outbox."""

    outcome: Outcome
    reason: Text | None = Field(default=None, max_length=MAX_REASON)
    reason_text: Text | None = Field(
        default=None, max_length=2 * MAX_REASON, description="the reason for a person"
    )
    details: list[Measure] = Field(
        default_factory=list, description="the measured values and limits behind the reason"
    )
    stage: Stage | None = None
    model: ModelRef | None
    backend: dict[str, Any] | None
    prediction: Prediction
    fields: list[FieldReport]
    spectrum: SpectrumReport
    timings_ms: dict[str, Milliseconds]
    firmware: dict[str, Any] | None = None
    simulation: Simulation | None = None
    recipe: Recipe | None = None

    @model_validator(mode="after")
    def _consistent(self) -> SlideReport:
        decided = self.outcome is Outcome.CLASSIFIED
        if decided == self.prediction.abstained:
            raise ValueError(f"prediction.abstained must be {not decided} for {self.outcome.value}")
        if decided and self.reason is not None:
            raise ValueError("a classified slide has no reason")
        if self.outcome is Outcome.ABSTAINED and self.reason not in {
            r.value for r in AbstainReason
        }:
            raise ValueError(f"abstained needs a reason from {[r.value for r in AbstainReason]}")
        if (self.outcome is Outcome.FAILED) != (self.stage is not None):
            raise ValueError("a stage is given exactly for failed slides")
        undecided = self.outcome in (Outcome.FAILED, Outcome.CANCELLED)
        if undecided and not self.reason:
            raise ValueError(f"{self.outcome.value} needs a reason")
        return self

    def with_context(
        self,
        firmware: Mapping[str, Any] | None,
        simulation: Simulation | None,
        recipe: Mapping[str, Any] | None = None,
    ) -> SlideReport:
        """A copy that also names the firmware, the recipe and, for simulated slides, the
        ground truth (validated like the rest)."""
        data = dict(self)
        data.update(
            firmware=dict(firmware) if firmware else None,
            simulation=simulation,
            recipe=None if recipe is None else Recipe.model_validate(dict(recipe)),
        )
        return type(self).model_validate(data)


def _context(
    model: Mapping[str, Any] | None,
    backend: Mapping[str, Any] | None,
    algorithm: str | None,
    fields: Sequence[FieldReport],
    timings_ms: Mapping[str, float],
) -> dict[str, Any]:
    return {
        "model": None if model is None else ModelRef.model_validate(dict(model)),
        "backend": None if backend is None else dict(backend),
        "fields": list(fields),
        "spectrum": SpectrumReport(algorithm=algorithm, axis=[], values=[]),
        "timings_ms": {k: round(float(v), 3) for k, v in timings_ms.items()},
    }


def _usable(fields: Sequence[FieldReport]) -> int:
    return sum(1 for f in fields if f.quality == "ok")


def _field_text(fields: Sequence[FieldReport]) -> str:
    """``field 0: focus 0.0021 is below the minimum 0.004; field 2: ...`` (failed fields only)."""
    parts = []
    for f in fields:
        if f.quality == "ok":
            continue
        why = "; ".join(c.text for c in f.checks) or ", ".join(f.reasons) or f.quality
        parts.append(f"field {f.index}: {why}")
    return " | ".join(parts)


def no_usable_field(
    model: Mapping[str, Any] | None,
    backend: Mapping[str, Any] | None,
    algorithm: str | None,
    fields: Sequence[FieldReport],
    timings_ms: Mapping[str, float],
) -> SlideReport:
    """No field passed quality control: scanned, nothing to classify, flagged for review."""
    text = f"0 of {len(fields)} fields passed quality control"
    detail = _field_text(fields)
    return SlideReport(
        outcome=Outcome.ABSTAINED,
        reason=AbstainReason.NO_USABLE_FIELD.value,
        reason_text=(f"{text} ({detail})" if detail else text)[: 2 * MAX_REASON],
        details=[measure(AbstainReason.NO_USABLE_FIELD.value, "usable_fields", 0, "<", 1)],
        prediction=NO_PREDICTION,
        **_context(model, backend, algorithm, fields, timings_ms),
    )


def insufficient_fields_text(usable: int, total: int, minimum: int) -> str:
    """The readable reason of an ``insufficient_fields`` slide."""
    return f"{usable} of {total} fields passed quality control; scan.min_usable_fields is {minimum}"


def failed(
    stage: Stage,
    reason: str,
    *,
    model: Mapping[str, Any] | None = None,
    backend: Mapping[str, Any] | None = None,
    algorithm: str | None = None,
    timings_ms: Mapping[str, float] | None = None,
) -> SlideReport:
    """The device path broke in ``stage``: no label, the reason says why."""
    return SlideReport(
        outcome=Outcome.FAILED,
        stage=stage,
        reason=(reason or "unknown error")[:MAX_REASON],
        prediction=NO_PREDICTION,
        **_context(model, backend, algorithm, (), timings_ms or {}),
    )


def cancelled(
    reason: str,
    *,
    model: Mapping[str, Any] | None = None,
    backend: Mapping[str, Any] | None = None,
    algorithm: str | None = None,
) -> SlideReport:
    """The scan was cancelled before a result: no label."""
    return SlideReport(
        outcome=Outcome.CANCELLED,
        reason=(reason or "cancelled")[:MAX_REASON],
        prediction=NO_PREDICTION,
        **_context(model, backend, algorithm, (), {}),
    )


# Errors that name their stage by type; a typed error with a ``stage`` attribute wins.
_STAGE_OF: tuple[tuple[type[BaseException], Stage], ...] = (
    (SpectrumInputError, Stage.SPECTRUM),
    (BundleError, Stage.MODEL),
    (GoldenMismatchError, Stage.MODEL),
    (BackendUnavailableError, Stage.MODEL),
    (EngineError, Stage.INFER),
)


def stage_of(exc: BaseException, default: Stage = Stage.INTERNAL) -> Stage:
    """The :class:`Stage` an error happened in: its ``stage`` attribute, else by type."""
    named = getattr(exc, "stage", None)
    if named is not None:
        try:
            return Stage(getattr(named, "value", named))
        except ValueError:
            pass
    for kind, stage in _STAGE_OF:
        if isinstance(exc, kind):
            return stage
    return default


def strict_json(data: Any) -> bytes:
    """Compact RFC 8259 JSON; raises ``ValueError`` on NaN or infinities (never writes them)."""
    return json.dumps(data, separators=(",", ":"), allow_nan=False).encode("utf-8")


def field_reports(qualities: Sequence[Any]) -> list[FieldReport]:
    """Field reports from QC verdicts (objects with index, valid_fraction, verdict, reasons)."""
    return [
        FieldReport(
            index=q.index if q.index is not None else i,
            valid_fraction=q.valid_fraction,
            quality=q.verdict,
            reasons=list(q.reasons),
            checks=list(getattr(q, "checks", ())),
        )
        for i, q in enumerate(qualities)
    ]
