"""The backend contract, run against every backend present here (Polygraphy-style).

``onnxruntime`` and ``torch`` run for real; ``tensorrt`` runs its bookkeeping (build, cache,
buffers, shapes, CUDA graph capture) against the strict stand-in in tests/fakes/tensorrt.py.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fakes import tensorrt as fake_trt
from fakes.bundles import make_bundle, tiny_model

from inference.backends import BackendOptions, InferenceBackend, backend_class, load_backend
from inference.bundle import Bundle
from inference.exceptions import BackendUnavailableError, InferenceError

HAVE_TORCH = importlib.util.find_spec("torch") is not None
MAX_BATCH = 4

CONTRACT = [
    "onnxruntime",
    pytest.param("torch", marks=pytest.mark.skipif(not HAVE_TORCH, reason="torch not installed")),
    "tensorrt-standin",
]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Bundle:
    return make_bundle(tmp_path_factory.mktemp("b") / "bundle", golden_n=5)


@pytest.fixture
def open_backend(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, bundle: Bundle
) -> Any:
    opened: list[InferenceBackend] = []

    def factory(kind: str, **opts: Any) -> InferenceBackend:
        name = kind
        if kind == "tensorrt-standin":
            fake_trt.install(monkeypatch)
            name = "tensorrt"
            opts.setdefault("precision", "fp32")
        opts.setdefault("max_batch", MAX_BATCH)
        backend = load_backend(name, bundle, BackendOptions(state_dir=str(tmp_path), **opts))
        opened.append(backend)
        return backend

    yield factory
    for b in opened:
        b.close()


@pytest.mark.parametrize("kind", CONTRACT)
def test_reproduces_golden_outputs(open_backend: Any, bundle: Bundle, kind: str) -> None:
    backend = open_backend(kind)
    x, y = bundle.golden()
    got = np.concatenate([backend.infer(x[i : i + MAX_BATCH]) for i in range(0, len(x), MAX_BATCH)])
    assert got.dtype == np.float32 and got.shape == y.shape
    assert np.abs(got - y).max() <= bundle.manifest.golden.tolerance["fp32"]
    assert (got.argmax(1) == y.argmax(1)).all()


@pytest.mark.parametrize("kind", CONTRACT)
def test_every_batch_size_matches_single_inputs(
    open_backend: Any, bundle: Bundle, kind: str
) -> None:
    backend = open_backend(kind)
    x, _ = bundle.golden()
    singles = np.concatenate([backend.infer(x[i : i + 1]) for i in range(MAX_BATCH)])
    for n in range(1, MAX_BATCH + 1):
        out = backend.infer(x[:n])
        assert out.shape == (n, 2)
        np.testing.assert_allclose(out, singles[:n], atol=1e-6)
        np.testing.assert_allclose(out.sum(1), 1.0, atol=1e-5)


@pytest.mark.parametrize("kind", CONTRACT)
@pytest.mark.parametrize(
    ("shape", "dtype", "message"),
    [
        ((1, 3, 32, 32), np.float64, "float32"),
        ((1, 3, 16, 32), np.float32, "input shape"),
        ((3, 32, 32), np.float32, "input shape"),
        ((0, 3, 32, 32), np.float32, "batch size 0"),
        ((MAX_BATCH + 1, 3, 32, 32), np.float32, "max_batch"),
    ],
)
def test_rejects_wrong_inputs(
    open_backend: Any, kind: str, shape: tuple[int, ...], dtype: Any, message: str
) -> None:
    backend = open_backend(kind)
    with pytest.raises(InferenceError, match=message):
        backend.infer(np.zeros(shape, dtype=dtype))


@pytest.mark.parametrize("kind", CONTRACT)
def test_rejects_non_arrays_and_use_after_close(open_backend: Any, kind: str) -> None:
    backend = open_backend(kind)
    with pytest.raises(InferenceError, match="numpy array"):
        backend.infer([[1.0]])
    backend.close()
    backend.close()  # idempotent
    with pytest.raises(InferenceError, match="closed"):
        backend.infer(np.zeros((1, 3, 32, 32), np.float32))
    with pytest.raises(InferenceError, match="closed"):
        backend.warmup()


@pytest.mark.parametrize("kind", CONTRACT)
def test_describe_names_backend_and_precision(open_backend: Any, kind: str) -> None:
    backend = open_backend(kind)
    backend.warmup()
    info = backend.describe()
    assert info["name"] == kind.removesuffix("-standin")
    assert info["precision"] == "fp32"
    assert info["degraded"] is False and info["degraded_reason"] is None
    assert backend.calls >= 1


@pytest.mark.parametrize("kind", CONTRACT)
def test_context_manager_closes_and_second_load_refused(
    open_backend: Any, bundle: Bundle, kind: str
) -> None:
    backend = open_backend(kind)
    with pytest.raises(InferenceError, match="already loaded"):
        backend.load(bundle)
    with backend:
        pass
    with pytest.raises(InferenceError, match="closed"):
        backend.infer(np.zeros((1, 3, 32, 32), np.float32))


def test_unknown_backend_name(bundle: Bundle) -> None:
    with pytest.raises(InferenceError, match="unknown inference backend 'tflite'"):
        load_backend("tflite", bundle)


def test_tensorrt_asked_for_without_tensorrt_is_unavailable(
    bundle: Bundle, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import fails, whatever is installed
    with pytest.raises(BackendUnavailableError, match="TensorRT is not installed"):
        load_backend("tensorrt", bundle)


def test_auto_prefers_tensorrt_then_onnxruntime(
    bundle: Bundle, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with load_backend("auto", bundle, BackendOptions(state_dir=str(tmp_path))) as b:
        info = b.describe()
    # The fallback is visible in every result: what was asked for and why TensorRT was passed over.
    assert info["name"] == "onnxruntime" and info["requested"] == "auto"
    assert len(info["skipped"]) == 1 and info["skipped"][0].startswith("tensorrt: TensorRT is not")
    fake_trt.install(monkeypatch)
    with load_backend("auto", bundle, BackendOptions(state_dir=str(tmp_path))) as b:
        info = b.describe()
    assert info["name"] == "tensorrt" and info["requested"] == "auto"
    assert info["precision"] == "fp16"  # TensorRT's default
    assert "skipped" not in info  # first choice: nothing passed over
    with load_backend("onnxruntime", bundle) as b:
        assert b.describe()["requested"] == "onnxruntime"


def test_auto_with_fp16_never_silently_runs_fp32(
    bundle: Bundle, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(BackendUnavailableError, match="onnxruntime cannot run fp16"):
        load_backend("auto", bundle, BackendOptions(precision="fp16"))


def test_onnxruntime_provider_asked_for_but_absent(
    bundle: Bundle, monkeypatch: pytest.MonkeyPatch
) -> None:
    import onnxruntime

    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CPUExecutionProvider"])
    with pytest.raises(BackendUnavailableError, match=r"'cuda'.*not available"):
        load_backend("onnxruntime", bundle, BackendOptions(provider="cuda"))


def test_torch_backend_names_the_missing_extra(
    bundle: Bundle, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(BackendUnavailableError, match=r"omis-edge\[train\]"):
        load_backend("torch", bundle)


@pytest.mark.skipif(not HAVE_TORCH, reason="torch not installed")
def test_torch_backend_refuses_ops_outside_its_table(tmp_path: Path, bundle: Bundle) -> None:
    import onnx

    model = tiny_model()
    for node in model.graph.node:
        if node.op_type == "Relu":
            node.op_type = "Tanh"
    onnx.save(model, str(tmp_path / "m.onnx"))

    class _B:
        model_path = tmp_path / "m.onnx"
        manifest = bundle.manifest

    backend = backend_class("torch")()
    with pytest.raises(BackendUnavailableError, match="'Tanh'"):
        backend._load(_B())  # type: ignore[arg-type]


def test_importing_inference_backends_imports_no_gpu_or_torch_module() -> None:
    import subprocess

    code = (
        "import sys, inference.backends, inference.pipeline, inference.golden, "
        "inference.engine_cache, inference.cli_device; "
        "bad = [m for m in ('torch', 'tensorrt', 'pycuda') if m in sys.modules]; "
        "sys.exit(1 if bad else 0)"
    )
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_onnxruntime_run_error_is_an_inference_error(open_backend: Any, bundle: Bundle) -> None:
    # onnxruntime raises its own pybind classes; callers catch only InferenceError.
    backend = open_backend("onnxruntime")
    backend._output_name = "no-such-output"  # real session, real onnxruntime failure
    x, _ = bundle.golden()
    with pytest.raises(InferenceError, match="onnxruntime"):
        backend.infer(x[:1])
