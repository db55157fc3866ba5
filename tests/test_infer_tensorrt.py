"""TensorRT backend bookkeeping against the strict stand-in: builder configuration, engine
cache hits and rebuilds, buffers, contexts and CUDA graph capture.

Real TensorRT cannot be installed here, in CI or on the lent GPU machines; see
docs/inference.md for which paths ran where.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from fakes import tensorrt as fake_trt
from fakes.bundles import make_bundle

from inference.backends import BackendOptions, load_backend
from inference.bundle import Bundle
from inference.exceptions import BackendUnavailableError, EngineError


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Bundle:
    return make_bundle(tmp_path_factory.mktemp("b") / "bundle")


@pytest.fixture
def knobs(monkeypatch: pytest.MonkeyPatch) -> fake_trt.Knobs:
    return fake_trt.install(monkeypatch)


def _opts(tmp_path: Path, **kw: object) -> BackendOptions:
    return BackendOptions(state_dir=str(tmp_path), **kw)  # type: ignore[arg-type]


def test_the_standin_fails_loudly_on_unexpected_use(knobs: fake_trt.Knobs) -> None:
    import tensorrt as trt  # the stand-in

    unexpected = r"unexpected use of tensorrt\.init_libnvinfer_plugins"
    with pytest.raises(AssertionError, match=unexpected):
        trt.init_libnvinfer_plugins  # noqa: B018
    builder = trt.Builder(trt.Logger(trt.Logger.WARNING))
    with pytest.raises(AssertionError, match=r"Builder\.max_batch_size"):
        builder.max_batch_size  # noqa: B018  (removed in TensorRT 10)
    with pytest.raises(AssertionError, match="explicit batch"):
        builder.create_network(1)


def test_fp16_build_configures_builder(
    bundle: Bundle, knobs: fake_trt.Knobs, tmp_path: Path
) -> None:
    opts = _opts(tmp_path, max_batch=6, opt_batch=2, workspace_mb=256)
    with load_backend("tensorrt", bundle, opts) as b:
        assert b.precision == "fp16"
        info = b.describe()
    assert knobs.flags == ["FP16"]
    assert knobs.config["WORKSPACE"] == 256 << 20
    assert knobs.profiles == [("input", (1, 3, 32, 32), (2, 3, 32, 32), (6, 3, 32, 32))]
    assert info["device"] == "Fake Orin (stand-in)" and info["compute_capability"] == "8.7"
    assert info["engine_built_now"] is True and Path(info["engine"]).is_file()
    assert knobs.pushes == knobs.pops and knobs.allocated == knobs.freed == 2


def test_dla_with_gpu_fallback_and_version_compatible(
    bundle: Bundle, knobs: fake_trt.Knobs, tmp_path: Path
) -> None:
    knobs.dla_cores = 2
    with load_backend("tensorrt", bundle, _opts(tmp_path, dla_core=1, version_compatible=True)):
        pass
    assert knobs.config["default_device_type"] == "DLA" and knobs.config["DLA_core"] == 1
    assert set(knobs.flags) == {"FP16", "GPU_FALLBACK", "VERSION_COMPATIBLE"}


def test_dla_core_that_does_not_exist_is_unavailable(
    bundle: Bundle, knobs: fake_trt.Knobs, tmp_path: Path
) -> None:
    with pytest.raises(BackendUnavailableError, match="DLA core 0 asked for; this device has 0"):
        load_backend("tensorrt", bundle, _opts(tmp_path, dla_core=0))


def test_fp16_without_fast_fp16_fails_loudly(
    bundle: Bundle, knobs: fake_trt.Knobs, tmp_path: Path
) -> None:
    knobs.fast_fp16 = False
    with pytest.raises(EngineError, match="no fast FP16"):
        load_backend("tensorrt", bundle, _opts(tmp_path))


def test_second_load_hits_the_cache(bundle: Bundle, knobs: fake_trt.Knobs, tmp_path: Path) -> None:
    with load_backend("tensorrt", bundle, _opts(tmp_path)):
        pass
    with load_backend("tensorrt", bundle, _opts(tmp_path)) as b:
        assert b.describe()["engine_built_now"] is False
    assert knobs.builds == 1
    # Another precision or profile is another engine.
    with load_backend("tensorrt", bundle, _opts(tmp_path, precision="fp32")):
        pass
    with load_backend("tensorrt", bundle, _opts(tmp_path, max_batch=2)):
        pass
    assert knobs.builds == 3
    assert len(list((tmp_path / "engines").glob("*.plan"))) == 3


def test_timing_cache_is_saved_and_reused(
    bundle: Bundle, knobs: fake_trt.Knobs, tmp_path: Path
) -> None:
    with load_backend("tensorrt", bundle, _opts(tmp_path)):
        pass
    (cache,) = (tmp_path / "engines").glob("timing-*.cache")
    assert cache.read_bytes() == b"timing:+"
    with load_backend("tensorrt", bundle, _opts(tmp_path, precision="fp32")):
        pass
    assert cache.read_bytes() == b"timing:++"  # loaded, extended, saved again


def _corrupt_consistently(plan: Path) -> None:
    """Garbage with a matching sidecar hash: only deserialisation can tell."""
    garbage = b"not a plan: magic tag does not match"
    plan.write_bytes(garbage)
    side = plan.with_suffix(".json")
    meta = json.loads(side.read_text())
    meta["plan_sha256"] = hashlib.sha256(garbage).hexdigest()
    side.write_text(json.dumps(meta))


def test_corrupt_engine_is_removed_and_rebuilt(
    bundle: Bundle, knobs: fake_trt.Knobs, tmp_path: Path
) -> None:
    with load_backend("tensorrt", bundle, _opts(tmp_path)) as b:
        plan = Path(b.describe()["engine"])
    _corrupt_consistently(plan)
    with load_backend("tensorrt", bundle, _opts(tmp_path)) as b:
        assert b.describe()["engine_built_now"] is True
        x, y = bundle.golden()
        assert np.abs(b.infer(x) - y).max() < 2e-2
    assert knobs.builds == 2
    assert plan.read_bytes().startswith(fake_trt.MAGIC)


def test_truncated_engine_is_rebuilt(bundle: Bundle, knobs: fake_trt.Knobs, tmp_path: Path) -> None:
    with load_backend("tensorrt", bundle, _opts(tmp_path)) as b:
        plan = Path(b.describe()["engine"])
    plan.write_bytes(plan.read_bytes()[:10])  # sidecar hash no longer matches
    with load_backend("tensorrt", bundle, _opts(tmp_path)) as b:
        assert b.describe()["engine_built_now"] is True
    assert knobs.builds == 2


def test_cuda_graph_captured_once_per_batch_size(
    bundle: Bundle, knobs: fake_trt.Knobs, tmp_path: Path
) -> None:
    x, _ = bundle.golden()
    with load_backend("tensorrt", bundle, _opts(tmp_path, cuda_graph=True, precision="fp32")) as b:
        ref = [b.infer(x[:n]) for n in (1, 2, 1, 2, 2)]
        assert knobs.graph_launches == 5
        # one plain warm-up enqueue per new shape, plus five replays
        assert knobs.executes == 2 + 5
    with load_backend("tensorrt", bundle, _opts(tmp_path, precision="fp32")) as plain:
        for got, n in zip(ref, (1, 2, 1, 2, 2), strict=True):
            np.testing.assert_array_equal(got, plain.infer(x[:n]))


def test_missing_pycuda_is_named(
    bundle: Bundle, knobs: fake_trt.Knobs, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "pycuda.driver", None)
    with pytest.raises(BackendUnavailableError, match="pycuda"):
        load_backend("tensorrt", bundle)
