"""The device pipeline: field pairs -> QC -> spectrum -> slide spectrum -> image -> model -> result.

Three stages run concurrently, joined by small bounded queues::

    acquire thread       pulls field pairs from the source (a microscope, a replay, a list)
    field thread         per field: spectrum histogram, then quality control; per slide: the sum
                         of the accepted fields' histograms, finalised into the slide spectrum
    caller's thread      per slide: render, preprocess, infer -> SlideResult

so acquiring the next field overlaps computing the current one, and classifying one slide
overlaps the next slide's fields.  A full queue blocks its producer (back-pressure: nothing is
ever dropped).  An error in any stage stops the others and is re-raised to the caller; threads
are always joined.  Integer histograms summed in field order, a byte-exact renderer and a fixed
backend make the result deterministic.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Generator, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from inference.backends.base import InferenceBackend
from inference.bundle import Bundle
from inference.decision import Call, Limits, decide
from inference.exceptions import BundleError, InferenceError, SpectrumInputError
from inference.integrity import check_image
from inference.preprocess import spectrum_to_tensor, to_tensor
from inference.render import out_of_range, render_params_from_json, render_spectrum
from inference.result import (
    AbstainReason,
    ModelRef,
    Outcome,
    SlideReport,
    SpectrumReport,
    field_reports,
)
from inference.spectrum import SpectrumBackend, open_backend, parse_params
from inference.spectrum.qc import FieldQuality, NoUsableFieldError, QCThresholds, SlideQC
from inference.spectrum.types import Spectrum
from inference.spectrum.validate import U8

log = logging.getLogger(__name__)

STAGES = ("acquire", "qc", "spectrum", "render", "preprocess", "infer", "total")

__all__ = [  # NoUsableFieldError lives with the QC it reports on; it is raised from here
    "STAGES",
    "FieldPair",
    "NoUsableFieldError",
    "PipelineConfig",
    "SlidePipeline",
    "SlideResult",
    "as_field",
    "timing_stats",
]


@dataclass(frozen=True)
class FieldPair:
    """One field: its index on the slide, the diffuse (W) and polarized (P) RGB images."""

    index: int
    diffuse: U8
    polarized: U8


def as_field(item: object, default_index: int) -> FieldPair:
    """Accept a FieldPair, ``(index, W, P)``, ``(W, P)`` or an object with diffuse/polarized."""
    if isinstance(item, FieldPair):
        return item
    if isinstance(item, tuple) and len(item) == 3:
        return FieldPair(int(item[0]), item[1], item[2])
    if isinstance(item, tuple) and len(item) == 2:
        return FieldPair(default_index, item[0], item[1])
    w, p = getattr(item, "diffuse", None), getattr(item, "polarized", None)
    if w is None or p is None:
        raise SpectrumInputError(f"field {default_index}: not a field pair ({type(item).__name__})")
    return FieldPair(int(getattr(item, "index", default_index)), w, p)


@dataclass(frozen=True)
class SlideResult:
    """The classification of one slide and how it was obtained."""

    call: Call
    model: dict[str, Any]
    backend: dict[str, Any]
    spectrum_backend: str
    fields: tuple[FieldQuality, ...]
    spectrum: Spectrum
    timings_ms: dict[str, float]
    mass_outside_window: float = 0.0  # of |spectrum|, outside the bundle's render window

    @property
    def label(self) -> str | None:
        """The decision (None when abstained)."""
        return self.call.prediction.label

    @property
    def probabilities(self) -> dict[str, float]:
        """Probability per class."""
        return dict(self.call.prediction.probabilities)

    @property
    def p_high(self) -> float:
        """p(high): the summed probability of the high-risk classes."""
        return float(self.call.prediction.p_high or 0.0)

    @property
    def risk(self) -> str | None:
        """The decided risk (None when abstained)."""
        return self.call.prediction.risk

    @property
    def abstained(self) -> bool:
        """True when no call was made."""
        return self.call.prediction.abstained

    @property
    def abstain_reason(self) -> AbstainReason | None:
        """Why no call was made (set exactly when abstained)."""
        return self.call.reason

    def report(self) -> SlideReport:
        """The typed result of this slide: the body of its ``omis.result/1`` message."""
        call = self.call
        return SlideReport(
            outcome=Outcome.ABSTAINED if self.abstained else Outcome.CLASSIFIED,
            reason=call.reason.value if call.reason else None,
            reason_text=call.reason_text,
            details=list(call.details),
            model=ModelRef.model_validate(self.model),
            backend=self.backend,
            prediction=call.prediction,
            fields=field_reports(self.fields),
            spectrum=SpectrumReport(
                algorithm=self.spectrum.algorithm,
                axis=self.spectrum.x_nm.tolist(),
                values=self.spectrum.y.tolist(),
                flags=list(self.spectrum.flags),
                mass_outside_window=self.mass_outside_window,
            ),
            timings_ms=self.timings_ms,
        )

    def to_json(self) -> dict[str, Any]:
        """The JSON of ``omis infer --json`` (and the prediction part of results)."""
        return {
            "label": self.label,
            "argmax_label": self.call.prediction.argmax_label,
            "probabilities": self.probabilities,
            "p_high": self.p_high,
            "risk": self.risk,
            "side": self.call.prediction.side,
            "abstained": self.abstained,
            "reason": self.abstain_reason.value if self.abstain_reason else None,
            "reason_text": self.call.reason_text,
            "mass_outside_window": self.mass_outside_window,
            "model": self.model,
            "backend": self.backend,
            "spectrum_backend": self.spectrum_backend,
            "fields": [q.to_json() for q in self.fields],
            "fields_used": [q.index for q in self.fields if q.ok],
            "spectrum": {
                "algorithm": self.spectrum.algorithm,
                "x_nm": self.spectrum.x_nm.tolist(),
                "y": self.spectrum.y.tolist(),
                "flags": list(self.spectrum.flags),
            },
            "timings_ms": self.timings_ms,
        }


@dataclass(frozen=True)
class PipelineConfig:
    """How the pipeline runs; the model contract itself comes from the bundle."""

    queue_size: int = 2
    spectrum_backend: str | SpectrumBackend = "auto"
    qc_thresholds: QCThresholds | None = None
    min_usable_fields: int = 1  # fewer fields passing QC: abstained (insufficient_fields)
    poll_s: float = 0.05
    join_timeout_s: float = 10.0


@dataclass
class _SlideAcc:
    """A slide's running sums in the field stage."""

    slide: int
    started: float
    qc: SlideQC
    timings: dict[str, float] = field(default_factory=lambda: dict.fromkeys(STAGES, 0.0))
    # (fields that passed QC, fields scanned) when they were counted elsewhere: a finished
    # spectrum has no fields here, its device's field QC already made it (None: count qc.fields)
    usable: tuple[int, int] | None = None


@dataclass(frozen=True)
class _Field:
    slide: int
    pair: FieldPair
    started: float
    acquire_ms: float


@dataclass(frozen=True)
class _EndSlide:
    slide: int
    started: float


@dataclass(frozen=True)
class _SlideSpectrum:
    acc: _SlideAcc
    spectrum: Spectrum


@dataclass(frozen=True)
class _Failure:
    error: BaseException


_DONE = object()
_STOPPED = object()  # a get() ended by the stop flag, not by an item


class _Channel:
    """A bounded queue whose puts and gets give up when the run is stopped."""

    def __init__(self, size: int, stop: threading.Event, poll_s: float) -> None:
        self._q: queue.Queue[object] = queue.Queue(maxsize=size)
        self._stop = stop
        self._poll = poll_s
        self.max_depth = 0
        self.undelivered: _Failure | None = None

    def put(self, item: object) -> bool:
        while not self._stop.is_set():
            try:
                self._q.put(item, timeout=self._poll)
            except queue.Full:
                continue
            self.max_depth = max(self.max_depth, self._q.qsize())
            return True
        return False

    def deliver(self, item: object, timeout_s: float) -> None:
        """Put even while stopping (failures must reach the caller); bounded wait."""
        try:
            self._q.put(item, timeout=timeout_s)
        except queue.Full:
            # Kept for the consumer: when it drains the queue it must raise this, not end.
            if isinstance(item, _Failure):
                self.undelivered = item
            log.error("pipeline: could not deliver %r (consumer gone)", item)

    def get(self) -> object:
        while True:
            try:
                return self._q.get(timeout=self._poll)
            except queue.Empty:
                if self._stop.is_set():
                    return _STOPPED


class SlidePipeline:
    """Classifies slides from field pairs with one loaded (and golden-checked) backend."""

    def __init__(
        self, bundle: Bundle, backend: InferenceBackend, config: PipelineConfig | None = None
    ) -> None:
        m = bundle.manifest
        self.bundle = bundle
        self.backend = backend
        self.config = config or PipelineConfig()
        if self.config.queue_size < 1:
            raise InferenceError("queue_size must be at least 1")
        self.params = parse_params(m.spectrum)
        self.render_params = render_params_from_json(m.render)
        image_size = (self.render_params.height, self.render_params.width)
        if m.input.representation == "image" and image_size != (m.input.height, m.input.width):
            raise BundleError(
                f"render size {self.render_params.width}x{self.render_params.height} does not "
                f"match the model input {m.input.width}x{m.input.height}"
            )
        self.max_depth: dict[str, int] = {"fields": 0, "slides": 0}
        self.spectrum_backend_name = ""

    def run_slide(self, fields: Iterable[object]) -> SlideResult:
        """Classify one slide."""
        results = list(self.run([fields]))
        return results[0]

    def classify_spectrum(self, x_nm: Any, y: Any, usable: tuple[int, int] = (1, 1)) -> SlideResult:
        """Classify a finished slide spectrum (one the device computed and published) with the
        same decision as :meth:`run`: thresholds, abstain band and out-of-range check.

        ``usable`` (fields that passed QC, fields scanned) stands in for the field QC that made
        the spectrum on the device: a published spectrum came from at least one usable field.
        ``omis validate`` scores archive exports through this; the axis must be the bundle's.
        """
        x, values = np.asarray(x_nm, dtype=np.float64), np.asarray(y, dtype=np.float64)
        if x.shape != values.shape or x.ndim != 1:
            raise SpectrumInputError(f"spectrum: axis {x.shape} and values {values.shape} differ")
        zeros = np.zeros(x.size, dtype=np.int64)
        spectrum = Spectrum(
            self.params, x, values, zeros, zeros, zeros, 0, 0, (), "precomputed", {}
        )
        acc = _SlideAcc(0, time.perf_counter(), self._slide_qc(), usable=usable)
        return self._classify(_SlideSpectrum(acc, spectrum))

    def run(self, slides: Iterable[Iterable[object]]) -> Generator[SlideResult, None, None]:
        """Classify slides one after the other, pipelined; yields one result per slide."""
        spectra, opened = self._open_spectrum()
        self.spectrum_backend_name = spectra.name
        stop = threading.Event()
        fields_q = _Channel(self.config.queue_size, stop, self.config.poll_s)
        slides_q = _Channel(self.config.queue_size, stop, self.config.poll_s)
        threads = [
            threading.Thread(target=self._acquire, args=(slides, fields_q), name="omis-acquire"),
            threading.Thread(
                target=self._fields, args=(spectra, fields_q, slides_q, stop), name="omis-fields"
            ),
        ]
        for t in threads:
            t.daemon = True  # a source stuck in a driver call must not keep the process alive
            t.start()
        try:
            yield from self._classify_all(slides_q)
        finally:
            stop.set()
            for t in threads:
                t.join(self.config.join_timeout_s)
                if t.is_alive():
                    log.warning(
                        "pipeline: %s did not stop in time (blocked in its source?)", t.name
                    )
            self.max_depth = {"fields": fields_q.max_depth, "slides": slides_q.max_depth}
            if opened:
                spectra.close()

    # -- stages ------------------------------------------------------------------------------

    def _open_spectrum(self) -> tuple[SpectrumBackend, bool]:
        chosen = self.config.spectrum_backend
        if isinstance(chosen, str):
            return open_backend(chosen), True
        return chosen, False

    def _acquire(self, slides: Iterable[Iterable[object]], out: _Channel) -> None:
        try:
            for slide_no, slide in enumerate(slides):
                started = time.perf_counter()
                source = iter(slide)
                try:
                    if not self._acquire_slide(slide_no, source, started, out):
                        return
                finally:
                    # The caller may still hold the source: close it here, so an acquisition
                    # generator runs its cleanup (LEDs off, prefetch worker stopped) now.
                    close = getattr(source, "close", None)
                    if close is not None:
                        close()
            out.put(_DONE)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller, re-raised there
            out.put(_Failure(exc))

    @staticmethod
    def _acquire_slide(
        slide_no: int, source: Iterator[object], started: float, out: _Channel
    ) -> bool:
        """Queue one slide's fields and its end; False when the run was stopped."""
        i = 0
        while True:
            t0 = time.perf_counter()
            item = next(source, _DONE)
            if item is _DONE:
                break
            pair = as_field(item, i)
            ms = (time.perf_counter() - t0) * 1e3
            if not out.put(_Field(slide_no, pair, started, ms)):
                return False
            i += 1
        return out.put(_EndSlide(slide_no, started))

    def _fields(
        self, spectra: SpectrumBackend, inp: _Channel, out: _Channel, stop: threading.Event
    ) -> None:
        acc: _SlideAcc | None = None
        try:
            while True:
                item = inp.get()
                if item is _STOPPED:
                    return
                if item is _DONE or isinstance(item, _Failure):
                    out.put(item)
                    return
                if isinstance(item, _Field | _EndSlide):
                    if acc is None or acc.slide != item.slide:
                        acc = _SlideAcc(item.slide, item.started, self._slide_qc())
                    if isinstance(item, _Field):
                        self._one_field(spectra, acc, item)
                        continue
                    if not out.put(self._finish_slide(acc, spectra.name)):
                        return
                    acc = None
        except BaseException as exc:  # noqa: BLE001 - handed to the caller, re-raised there
            # Deliver first, then stop the acquirer: the caller must see the error, not an end.
            out.deliver(_Failure(exc), self.config.join_timeout_s)
            stop.set()

    def _one_field(self, spectra: SpectrumBackend, acc: _SlideAcc, item: _Field) -> None:
        pair = item.pair
        t0 = time.perf_counter()
        try:
            h = spectra.histogram(pair.diffuse, pair.polarized, self.params)
        except SpectrumInputError as exc:
            raise SpectrumInputError(f"slide {item.slide} field {pair.index}: {exc}") from exc
        t1 = time.perf_counter()
        q = acc.qc.add(pair.diffuse, pair.polarized, h, pair.index)
        t2 = time.perf_counter()
        if not q.ok:
            log.warning(
                "slide %d field %d rejected by QC: %s", item.slide, pair.index, ", ".join(q.reasons)
            )
        acc.timings["acquire"] += item.acquire_ms
        acc.timings["spectrum"] += (t1 - t0) * 1e3
        acc.timings["qc"] += (t2 - t1) * 1e3

    def _slide_qc(self) -> SlideQC:
        # The bundle's thresholds (those its training data passed) unless the caller overrides.
        qc = self.config.qc_thresholds or self.bundle.manifest.qc_thresholds
        return SlideQC(self.params, qc)

    def _finish_slide(self, acc: _SlideAcc, backend_name: str) -> _SlideSpectrum:
        t0 = time.perf_counter()
        try:
            spectrum = acc.qc.finish(backend_name).spectrum
        except NoUsableFieldError as exc:
            total = (time.perf_counter() - acc.started) * 1e3
            timings = {**acc.timings, "total": total}
            raise NoUsableFieldError(f"slide {acc.slide}: {exc}", exc.fields, timings) from None
        except SpectrumInputError as exc:
            raise SpectrumInputError(f"slide {acc.slide}: {exc}") from None
        acc.timings["spectrum"] += (time.perf_counter() - t0) * 1e3
        return _SlideSpectrum(acc, spectrum)

    def _classify_all(self, inp: _Channel) -> Iterator[SlideResult]:
        while True:
            item = inp.get()
            if item is _DONE:
                return
            if item is _STOPPED:
                # Only a failed stage stops the run under the consumer: never end normally.
                failure = inp.undelivered
                if failure is not None:
                    raise failure.error
                raise InferenceError("pipeline stopped before the last slide was classified")
            if isinstance(item, _Failure):
                raise item.error
            if isinstance(item, _SlideSpectrum):
                yield self._classify(item)

    def _classify(self, item: _SlideSpectrum) -> SlideResult:
        acc, spectrum = item.acc, item.spectrum
        probs = self._infer(spectrum, acc.timings)
        acc.timings["total"] = (time.perf_counter() - acc.started) * 1e3
        return self._result(probs, tuple(acc.qc.fields), acc.timings, spectrum, acc.usable)

    def classify_slide_spectrum(
        self, spectrum: Spectrum, fields: tuple[FieldQuality, ...]
    ) -> SlideResult:
        """Classify a slide spectrum computed elsewhere (no acquisition, no second spectrum).

        The shadow candidate runs here on the serving pipeline's spectrum of each slide; the
        normal path runs the same render -> preprocess -> infer -> decide code.  ``fields`` are
        the slide's field QC results (the minimum-usable-fields rule needs them).
        """
        timings = dict.fromkeys(STAGES, 0.0)
        t0 = time.perf_counter()
        probs = self._infer(spectrum, timings)
        timings["total"] = (time.perf_counter() - t0) * 1e3
        return self._result(probs, fields, timings, spectrum)

    def _infer(self, spectrum: Spectrum, t: dict[str, float]) -> Any:
        """render -> preprocess -> infer of one slide spectrum; stage times into ``t``."""
        t0 = time.perf_counter()
        spec = self.bundle.manifest.input
        if spec.representation == "spectrum":  # the model reads the vector: nothing to draw
            t1 = t0
            tensor = spectrum_to_tensor([spectrum.y], spec)
        else:
            image = render_spectrum(spectrum.x_nm, spectrum.y, self.render_params)
            rp = self.render_params
            check_image("render", image, (rp.height, rp.width, 3))
            t1 = time.perf_counter()
            tensor = to_tensor([image], spec)
        t2 = time.perf_counter()
        probs = self.backend.infer(tensor)[0]
        t3 = time.perf_counter()
        t["render"], t["preprocess"], t["infer"] = (t1 - t0) * 1e3, (t2 - t1) * 1e3, (t3 - t2) * 1e3
        return probs

    def _result(
        self,
        probs: Any,
        fields: tuple[FieldQuality, ...],
        timings: dict[str, float],
        spectrum: Spectrum,
        usable: tuple[int, int] | None = None,
    ) -> SlideResult:
        m = self.bundle.manifest
        th = m.thresholds
        outside = out_of_range(spectrum.x_nm, spectrum.y, self.render_params, th.out_of_range)[0]
        limits = Limits(
            decision=th.decision,
            band=(th.abstain_low, th.abstain_high),
            out_of_range=th.out_of_range,
            min_usable_fields=self.config.min_usable_fields,
        )
        call = decide(
            m.classes,
            [float(p) for p in probs],
            m.risk,
            limits,
            mass_outside=outside,
            usable=usable or (sum(1 for q in fields if q.ok), len(fields)),
        )
        return SlideResult(
            call=call,
            model=self.bundle.describe(),
            backend=self.backend.describe(),
            spectrum_backend=spectrum.backend,
            fields=fields,
            spectrum=spectrum,
            timings_ms={k: round(v, 3) for k, v in timings.items()},
            mass_outside_window=outside,
        )


def timing_stats(results: list[SlideResult], wall_s: float) -> dict[str, Any]:
    """Per-stage median and p95 (ms) over ``results`` and the throughput of the run."""
    stages: dict[str, dict[str, float]] = {}
    for stage in STAGES:
        values = np.array([r.timings_ms[stage] for r in results], dtype=np.float64)
        stages[stage] = {
            "median_ms": round(float(np.median(values)), 3) if values.size else 0.0,
            "p95_ms": round(float(np.percentile(values, 95)), 3) if values.size else 0.0,
        }
    n_fields = sum(len(r.fields) for r in results)
    return {
        "slides": len(results),
        "fields": n_fields,
        "wall_s": round(wall_s, 4),
        "slides_per_s": round(len(results) / wall_s, 3) if wall_s > 0 else 0.0,
        "fields_per_s": round(n_fields / wall_s, 3) if wall_s > 0 else 0.0,
        "stages": stages,
    }
