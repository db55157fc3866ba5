"""The golden gate: pass, fail with numbers, top-class and NaN checks, FP16 -> FP32 fallback."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fakes import tensorrt as fake_trt
from fakes.bundles import make_bundle

from inference.backends import BackendOptions, load_backend
from inference.exceptions import GoldenMismatchError
from inference.golden import check_golden, golden_report, open_checked


def test_passes_with_the_numbers(tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path / "b")
    backend, report = open_checked("onnxruntime", bundle)
    with backend:
        assert report.passed and report.n == 4 and report.max_abs_diff <= 1e-6
        assert report.to_json()["tolerance"] == 1e-4
        assert backend.calls >= 2  # warm-up, then the golden batch


def test_fails_beyond_tolerance_with_the_numbers(tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path / "b", golden_offset=0.01)
    pattern = r"max \|Δp\| = 0\.01 \(tolerance 0\.0001\)"
    with (
        load_backend("onnxruntime", bundle) as backend,
        pytest.raises(GoldenMismatchError, match=pattern),
    ):
        check_golden(backend, bundle)


def test_top_class_must_agree_even_within_tolerance(tmp_path: Path) -> None:
    bundle = make_bundle(
        tmp_path / "b", swap_golden_classes=True, tolerance={"fp32": 1.0, "fp16": 1.0}
    )
    with load_backend("onnxruntime", bundle) as backend:
        report = golden_report(backend, bundle)
    assert report.max_abs_diff <= 1.0
    assert report.top_class_mismatches == (0, 1, 2, 3) and not report.passed


def test_nan_outputs_fail(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bundle = make_bundle(tmp_path / "b")
    with load_backend("onnxruntime", bundle) as backend:
        monkeypatch.setattr(backend, "_infer", lambda x: np.full((len(x), 2), np.nan, np.float32))
        with pytest.raises(GoldenMismatchError, match="NaN"):
            check_golden(backend, bundle)


def _trt(monkeypatch: pytest.MonkeyPatch, fp16_error: float) -> fake_trt.Knobs:
    knobs = fake_trt.install(monkeypatch)
    knobs.fp16_error = fp16_error
    return knobs


def test_good_fp16_engine_serves_undegraded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _trt(monkeypatch, 0.0)
    bundle = make_bundle(tmp_path / "b")
    backend, report = open_checked("tensorrt", bundle, BackendOptions(state_dir=str(tmp_path)))
    with backend:
        assert report.precision == "fp16" and report.tolerance == 2e-2 and report.passed
        assert backend.describe()["degraded"] is False


def test_failing_fp16_falls_back_to_fp32_degraded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: Any
) -> None:
    _trt(monkeypatch, 0.3)
    bundle = make_bundle(tmp_path / "b", allow_fp32_fallback=True)
    backend, report = open_checked("auto", bundle, BackendOptions(state_dir=str(tmp_path)))
    with backend:
        info = backend.describe()
    assert report.precision == "fp32" and report.passed
    assert info["name"] == "tensorrt" and info["precision"] == "fp32"
    assert info["degraded"] is True and "FP16 failed the golden gate" in info["degraded_reason"]
    assert "max |Δp|" in info["degraded_reason"]
    assert info["requested"] == "auto"  # the fallback still says auto chose it
    assert any("falling back to FP32" in r.message for r in caplog.records)


def test_failing_fp16_without_permission_is_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    knobs = _trt(monkeypatch, 0.3)
    bundle = make_bundle(tmp_path / "b", allow_fp32_fallback=False)
    with pytest.raises(GoldenMismatchError, match="does not allow an FP32 fallback"):
        open_checked("tensorrt", bundle, BackendOptions(state_dir=str(tmp_path)))
    assert knobs.builds == 1 and knobs.pushes == knobs.pops and knobs.allocated == knobs.freed


def test_failing_fp32_never_falls_back(tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path / "b", golden_offset=0.5)
    with pytest.raises(GoldenMismatchError):
        open_checked("onnxruntime", bundle)


def test_golden_batches_larger_than_max_batch_are_chunked(tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path / "b", golden_n=7)
    backend, report = open_checked("onnxruntime", bundle, BackendOptions(max_batch=3))
    with backend:
        assert report.passed and report.n == 7


def test_torch_fp16_passes_the_gate_with_the_fp16_tolerance(tmp_path: Path) -> None:
    """The torch backend in FP16 (the GPU stand-in for a TensorRT FP16 engine) is really
    half precision: it differs from the FP32 golden outputs, but within the FP16 tolerance."""
    pytest.importorskip("torch")
    bundle = make_bundle(tmp_path / "b")
    backend, report = open_checked("torch", bundle, BackendOptions(precision="fp16"))
    try:
        assert report.passed and report.precision == "fp16" and report.tolerance == 2e-2
        assert backend.describe()["precision"] == "fp16"
        inputs, want = bundle.golden()
        got = backend.infer(inputs)
        assert got.dtype == np.float32
        assert 0.0 < float(np.abs(got - want).max()) <= 2e-2  # rounded, yet within tolerance
    finally:
        backend.close()
