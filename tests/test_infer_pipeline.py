"""The pipelined slide scan: results, determinism, abstain band, back-pressure, errors."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fakes.bundles import make_bundle, make_field

from inference.backends import InferenceBackend, load_backend
from inference.bundle import Bundle
from inference.exceptions import BundleError, SpectrumInputError
from inference.pipeline import FieldPair, NoUsableFieldError, PipelineConfig, SlidePipeline
from inference.preprocess import to_tensor
from inference.render import render_params_from_json, render_spectrum
from inference.spectrum import NumpyBackend, parse_params
from inference.spectrum.qc import compute_slide_spectrum

QUEUE = 2


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Bundle:
    return make_bundle(tmp_path_factory.mktemp("b") / "bundle")


@pytest.fixture
def backend(bundle: Bundle) -> Iterator[InferenceBackend]:
    with load_backend("onnxruntime", bundle) as b:
        yield b


def _pipe(bundle: Bundle, backend: InferenceBackend, **kw: Any) -> SlidePipeline:
    kw.setdefault("spectrum_backend", "numpy")
    kw.setdefault("queue_size", QUEUE)
    return SlidePipeline(bundle, backend, PipelineConfig(**kw))


def _no_worker_threads() -> bool:
    return not any(t.name.startswith("omis-") for t in threading.enumerate())


def test_result_equals_the_unpipelined_computation(
    bundle: Bundle, backend: InferenceBackend
) -> None:
    fields = [make_field(i) for i in range(3)]
    result = _pipe(bundle, backend).run_slide(fields)
    m = bundle.manifest
    slide = compute_slide_spectrum(fields, parse_params(m.spectrum), backend="numpy")
    image = render_spectrum(
        slide.spectrum.x_nm, slide.spectrum.y, render_params_from_json(m.render)
    )
    expected = backend.infer(to_tensor([image], m.input))[0]
    np.testing.assert_array_equal(result.spectrum.y, slide.spectrum.y)
    assert result.probabilities == {"low": float(expected[0]), "high": float(expected[1])}
    assert result.label == m.classes[int(np.argmax(expected))]
    assert result.spectrum_backend == "numpy" and result.backend["name"] == "onnxruntime"
    assert result.model == bundle.describe()
    assert [q.index for q in result.fields] == [0, 1, 2]
    assert set(result.timings_ms) == {
        "acquire",
        "qc",
        "spectrum",
        "render",
        "preprocess",
        "infer",
        "total",
    }
    assert result.timings_ms["total"] >= result.timings_ms["infer"]
    assert _no_worker_threads()


def test_deterministic(bundle: Bundle, backend: InferenceBackend) -> None:
    fields = [make_field(i) for i in range(2)]
    a = _pipe(bundle, backend).run_slide(fields)
    b = _pipe(bundle, backend, queue_size=1).run_slide(list(fields))
    assert a.probabilities == b.probabilities and a.label == b.label
    np.testing.assert_array_equal(a.spectrum.hist, b.spectrum.hist)


def test_field_forms_accepted(bundle: Bundle, backend: InferenceBackend) -> None:
    w, p = make_field(0)

    class MicroscopeField:
        index = 7
        diffuse = w
        polarized = p

    result = _pipe(bundle, backend).run_slide(
        [FieldPair(3, w, p), (5, w, p), (w, p), MicroscopeField()]
    )
    assert [q.index for q in result.fields] == [3, 5, 2, 7]
    with pytest.raises(SpectrumInputError, match="not a field pair"):
        _pipe(bundle, backend).run_slide(["nonsense"])


def test_several_slides_in_order(bundle: Bundle, backend: InferenceBackend) -> None:
    slides = [[make_field(10 * s + i) for i in range(2)] for s in range(4)]
    pipe = _pipe(bundle, backend)
    results = list(pipe.run(slides))
    singles = [_pipe(bundle, backend).run_slide(s) for s in slides]
    assert [r.probabilities for r in results] == [r.probabilities for r in singles]
    assert pipe.max_depth["fields"] <= QUEUE and pipe.max_depth["slides"] <= QUEUE


@pytest.mark.parametrize(
    ("logits", "abstained", "side", "label"),
    [
        ((0.0, 0.0), True, "high", None),  # p(high) = 0.5 exactly: inside the band, leans high
        ((0.0, 0.5), True, "high", None),  # 0.62
        ((0.0, 1.0), False, "high", "high"),  # 0.73
        ((0.5, 0.0), True, "low", None),  # 0.38
        ((1.0, 0.0), False, "low", "low"),  # 0.27
    ],
)
def test_abstain_band_and_decision(
    tmp_path: Path, logits: tuple[float, float], abstained: bool, side: str, label: str | None
) -> None:
    b = make_bundle(tmp_path / "b", logits=logits)
    with load_backend("onnxruntime", b) as be:
        r = _pipe(b, be).run_slide([make_field(0)])
    p_high = 1.0 / (1.0 + np.exp(logits[0] - logits[1]))
    assert r.p_high == pytest.approx(p_high, abs=1e-6)
    prediction = r.report().prediction
    # An undecided slide has no call (label and risk None) but states the side it leans to.
    assert (r.abstained, r.label, r.risk) == (abstained, label, label)
    assert (prediction.side or prediction.risk) == side


@pytest.mark.parametrize(
    ("threshold", "outcome", "reason"),
    [(0.05, "abstained", "out_of_range"), (None, "classified", None)],
)
def test_a_spectrum_outside_the_training_window_is_abstained(
    tmp_path: Path, threshold: float | None, outcome: str, reason: str | None
) -> None:
    # A confident model whose render window ([-10, 10] nm) leaves most of the slide's spectral
    # mass outside: the slide is unlike the training data, so it is not decided.
    b = make_bundle(
        tmp_path / "b",
        logits=(4.0, -4.0),
        render={"x_range_nm": [-10.0, 10.0]},
        thresholds={"out_of_range": threshold} if threshold is not None else None,
    )
    with load_backend("onnxruntime", b) as be:
        r = _pipe(b, be).run_slide([make_field(0)])
    assert r.mass_outside_window > 0.05
    report = r.report()
    assert (report.outcome.value, report.reason) == (outcome, reason)
    assert report.prediction.abstained is (outcome == "abstained")
    assert report.spectrum.mass_outside_window == pytest.approx(r.mass_outside_window)
    assert r.to_json()["reason"] == reason


def test_the_bundles_qc_thresholds_judge_the_fields(tmp_path: Path) -> None:
    # The device applies the thresholds the model's training data passed, not its own defaults.
    strict = make_bundle(tmp_path / "strict", qc={"min_focus": 1e6})
    assert strict.manifest.qc_thresholds.min_focus == 1e6
    with load_backend("onnxruntime", strict) as be, pytest.raises(NoUsableFieldError):
        _pipe(strict, be).run_slide([make_field(0)])
    with pytest.raises(BundleError, match="qc"):
        make_bundle(tmp_path / "bad", qc={"min_valid_fraction": 2.0})


class SlowSpectrum:
    """A real NumPy spectrum that takes its time, and counts what it finished."""

    name = "slow-numpy"

    def __init__(self, delay_s: float, fail_at: int | None = None) -> None:
        self.delay_s = delay_s
        self.fail_at = fail_at
        self.done = 0
        self._inner = NumpyBackend()

    def histogram(self, w: Any, p: Any, params: Any, mask: Any = None) -> Any:
        if self.fail_at is not None and self.done == self.fail_at:
            raise SpectrumInputError("simulated spectrum failure")
        time.sleep(self.delay_s)
        h = self._inner.histogram(w, p, params, mask)
        self.done += 1
        return h

    def close(self) -> None:
        pass


def test_back_pressure_blocks_the_producer_and_drops_nothing(
    bundle: Bundle, backend: InferenceBackend
) -> None:
    slow = SlowSpectrum(0.02)
    lead: list[int] = []
    field = make_field(0)

    def source() -> Iterator[tuple[int, Any, Any]]:
        for i in range(12):
            lead.append(i - slow.done)  # how far acquisition is ahead of the slow stage
            yield i, *field

    pipe = _pipe(bundle, backend, spectrum_backend=slow)
    result = pipe.run_slide(source())
    assert slow.done == 12 and len(result.fields) == 12  # nothing dropped
    assert pipe.max_depth["fields"] <= QUEUE
    # queued items + the one being computed + the one the producer holds while blocked
    assert max(lead) <= QUEUE + 2


def test_source_error_propagates_without_hanging(bundle: Bundle, backend: InferenceBackend) -> None:
    def source() -> Iterator[Any]:
        yield make_field(0)
        raise OSError("camera unplugged")

    t0 = time.monotonic()
    with pytest.raises(OSError, match="camera unplugged"):
        _pipe(bundle, backend).run_slide(source())
    assert time.monotonic() - t0 < 5 and _no_worker_threads()


def test_stage_error_propagates_and_stops_acquisition(
    bundle: Bundle, backend: InferenceBackend
) -> None:
    pulled: list[int] = []

    def source() -> Iterator[Any]:
        for i in range(1000):
            pulled.append(i)
            yield make_field(0)

    with pytest.raises(SpectrumInputError, match="simulated spectrum failure"):
        _pipe(bundle, backend, spectrum_backend=SlowSpectrum(0.0, fail_at=2)).run_slide(source())
    assert len(pulled) < 20 and _no_worker_threads()


def test_inference_error_propagates(bundle: Bundle, backend: InferenceBackend) -> None:
    backend.close()
    with pytest.raises(Exception, match="closed"):
        _pipe(bundle, backend).run_slide([make_field(0)])
    assert _no_worker_threads()


def test_consumer_stopping_early_joins_threads(bundle: Bundle, backend: InferenceBackend) -> None:
    slides = ([make_field(s)] for s in range(50))
    gen = _pipe(bundle, backend).run(slides)
    next(gen)
    gen.close()
    assert _no_worker_threads()


def test_rejected_fields_are_left_out_and_flagged(
    bundle: Bundle, backend: InferenceBackend
) -> None:
    dark = np.zeros((48, 48, 3), np.uint8)
    good = [make_field(0), make_field(1)]
    result = _pipe(bundle, backend).run_slide([good[0], (dark, dark), good[1]])
    assert [q.verdict for q in result.fields] == ["ok", "reject", "ok"]
    assert "fields_excluded" in result.spectrum.flags
    only_good = _pipe(bundle, backend).run_slide(good)
    np.testing.assert_array_equal(result.spectrum.y, only_good.spectrum.y)
    assert result.to_json()["fields_used"] == [0, 2]


def test_slide_with_no_usable_field_is_an_error(bundle: Bundle, backend: InferenceBackend) -> None:
    dark = np.zeros((48, 48, 3), np.uint8)
    with pytest.raises(SpectrumInputError, match="no field passed quality control"):
        _pipe(bundle, backend).run_slide([(dark, dark)])


def test_render_size_must_match_model_input(tmp_path: Path, backend: InferenceBackend) -> None:
    b = make_bundle(tmp_path / "b")
    bad = b.manifest.model_copy(update={"render": {**b.manifest.render, "width": 64}})
    with pytest.raises(BundleError, match="does not match the model input"):
        SlidePipeline(type(b)(b.root, bad, b.manifest_bytes), backend)


def test_a_failed_run_closes_the_slide_source(bundle: Bundle, backend: InferenceBackend) -> None:
    # The caller keeps the source alive (as run_slide's argument does), so only the pipeline can
    # close it: an acquisition generator left suspended keeps its listener and its prefetch
    # worker (which keeps moving the stage and flashing the LEDs) alive.
    closed = threading.Event()
    w, p = make_field(0)

    def source() -> Iterator[tuple[Any, Any]]:
        try:
            yield w, p
            yield w[:8], p  # a field of the wrong shape: the field stage fails
            for i in range(1, 1000):
                yield make_field(i)
        finally:
            closed.set()

    fields = source()
    with pytest.raises(SpectrumInputError):
        _pipe(bundle, backend).run_slide(fields)
    assert closed.is_set()
    assert _no_worker_threads()


def test_an_undeliverable_error_is_not_a_normal_end(
    bundle: Bundle, backend: InferenceBackend
) -> None:
    # The field stage fails while the slow consumer's queue is full and the bounded delivery
    # gives up: the run must still end in an error, never as if every slide had been classified.
    w, p = make_field(0)
    slides = [[(w, p)], [(w, p)], [(w, p), (w[:8], p)]]
    pipe = _pipe(bundle, backend, queue_size=1, join_timeout_s=0.2)
    got = []
    with pytest.raises(SpectrumInputError, match="slide 2 field 1"):
        for result in pipe.run(slides):
            got.append(result)
            time.sleep(1.0)  # slower than the delivery timeout
    assert len(got) < 3
    assert _no_worker_threads()
