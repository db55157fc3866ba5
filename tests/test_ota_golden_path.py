"""The golden gate covers the whole device path, before a model may serve.

Every bundle here is correctly signed and passes the tensor-level gate (its model reproduces
``golden/inputs.npy`` -> ``golden/outputs.npy``); what differs is in front of the network: the
spectrum, the rendering or the preprocessing.  ``omis ota install``, the daemon's OTA path
(``open_checked``), ``omis selftest`` and the gate with another spectrum backend refuse them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fakes.bundles import make_bundle as make_plain_bundle
from ota_support import Edit, install_cli, make_bundle, make_keys, resigned, set_key

from deploy.ota import GoldenGate, Installer, ModelStore, TrustStore
from inference.backends import load_backend
from inference.bundle import Bundle, load_bundle
from inference.exceptions import GoldenMismatchError
from inference.golden import open_checked
from inference.golden_path import HISTOGRAMS, check_device_path
from inference.spectrum import NumpyBackend
from inference.spectrum.types import Histogram

OMIS = [sys.executable, "-m", "deploy.cli"]


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return make_keys(tmp_path_factory.mktemp("keys"))


@pytest.fixture
def device(tmp_path: Path, keys: tuple[Path, Path]) -> Path:
    state = tmp_path / "state"
    TrustStore(state).add(keys[1])
    Installer(ModelStore(state), TrustStore(state), GoldenGate(backend="onnxruntime")).install(
        make_bundle(tmp_path / "v2", 2, key=keys[0])
    )
    return state


def _no_fields(root: Path, raw: dict[str, Any]) -> None:
    raw["golden"]["fields"] = 0
    for path in (root / "golden" / "fields").iterdir():
        path.unlink()
    for path in (root / "golden" / "path").iterdir():
        path.unlink()


def _edit_hist(root: Path, raw: dict[str, Any]) -> None:
    arr = np.load(root / HISTOGRAMS)
    arr[0, arr.shape[1] // 2] += 1
    np.save(root / HISTOGRAMS, arr)


CASES: list[tuple[str, Edit, str]] = [
    # The spectrum the device computes is not the one the bundle expects.
    # (a saturation limit this low first fails the bundle's own QC acceptance: refused too)
    ("spectrum t_sat", set_key("spectrum.t_sat", 120), "QC thresholds reject 2 of its 2 golden"),
    ("spectrum golden", _edit_hist, "golden field 0: the numpy spectrum differs"),
    ("spectrum bins", set_key("spectrum.bins", 65), "golden/path/histograms.npy: expected"),
    # The renderer draws another image.
    ("render line", set_key("render.line_width", 3), "rendered image differs"),
    ("render y range", set_key("render.y_range", [-1.0, 40.0]), "rendered image differs"),
    # Preprocessing gives another tensor, or NaN/inf (the bundle would have decided on NaN).
    ("normalisation", set_key("input.normalization.mean", [0.4, 0.4, 0.4]), "input tensor"),
    ("NaN tensor", set_key("input.normalization.std", [0.2, 1e-39, 0.2]), "preprocess"),
    ("no golden fields", _no_fields, "no golden field pairs"),
]


@pytest.mark.parametrize(("case", "edit", "reason"), CASES, ids=[c[0] for c in CASES])
def test_install_refuses_a_bundle_whose_device_path_differs(
    device: Path, tmp_path: Path, keys: tuple[Path, Path], case: str, edit: Edit, reason: str
) -> None:
    bundle = resigned(make_bundle(tmp_path / "v3", 3), keys[0], edit)
    r = install_cli(device, bundle)
    assert r.returncode != 0
    last_line = r.stderr.strip().splitlines()[-1]
    assert "Traceback" not in r.stderr and last_line.startswith("omis ota: error: "), r.stderr
    assert reason in last_line
    st = ModelStore(device).state()
    assert (st["current"], st["pending"], st["step"]) == (2, None, None)
    assert st["last_outcome"]["result"] == "rejected"
    assert not (device / "models" / "journal.json").exists()
    assert list((device / "models" / "staging").glob("*")) == []


class OffByOne(NumpyBackend):
    """A spectrum backend that disagrees with NumPy by one count (a broken CUDA kernel)."""

    name = "off-by-one"

    def histogram(self, w: Any, p: Any, params: Any, mask: Any = None) -> Histogram:
        h = super().histogram(w, p, params, mask)
        hist = h.hist.copy()
        hist[-1] += 1
        return Histogram(h.algorithm, hist, h.count, h.valid_pixels, h.total_pixels)


def test_the_spectrum_backend_in_use_is_proven(tmp_path: Path) -> None:
    bundle = make_plain_bundle(tmp_path / "b")
    backend, report = open_checked("onnxruntime", bundle, spectrum_backend="numpy")
    with backend:
        assert report.path is not None and report.path["spectrum_backend"] == "numpy"
        assert report.path["fields"] == 2 and report.path["max_prob_diff"] <= 1e-4
        with pytest.raises(GoldenMismatchError, match="the off-by-one spectrum differs"):
            check_device_path(backend, bundle, OffByOne())
    with pytest.raises(GoldenMismatchError, match="off-by-one spectrum differs"):
        open_checked("onnxruntime", bundle, spectrum_backend=OffByOne())


def test_a_model_that_matches_tensors_but_not_the_path_is_refused(tmp_path: Path) -> None:
    bundle = make_plain_bundle(tmp_path / "b")
    # Only the path probabilities are wrong: the tensor-level gate alone would pass.
    path = bundle.root / "golden" / "path" / "outputs.npy"
    np.save(path, np.ascontiguousarray(np.load(path)[:, ::-1]))
    unchecked = Bundle(bundle.root, bundle.manifest, bundle.manifest_bytes)
    with (
        load_backend("onnxruntime", unchecked) as backend,
        pytest.raises(GoldenMismatchError, match="probabilities differ"),
    ):
        check_device_path(backend, unchecked, "numpy")


def _selftest(bundle: Path, state: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMIS_STATE_DIR": str(state)}
    cmd = [*OMIS, "selftest", "-q", "--bundle", str(bundle), "--json"]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env, check=False)


def test_selftest_runs_the_golden_fields(tmp_path: Path) -> None:
    good = make_plain_bundle(tmp_path / "good").root
    r = _selftest(good, tmp_path / "state")
    assert r.returncode == 0, r.stderr
    golden = next(c for c in json.loads(r.stdout)["checks"] if c["name"] == "golden")
    assert golden["golden"]["path"]["fields"] == 2
    bad = make_plain_bundle(tmp_path / "bad").root
    raw = json.loads((bad / "manifest.json").read_bytes())
    raw["render"]["line_width"] = 3
    (bad / "manifest.json").write_text(json.dumps(raw))
    load_bundle(bad)  # still a valid bundle; only the device path disagrees
    r = _selftest(bad, tmp_path / "state")
    assert r.returncode == 1
    golden = next(c for c in json.loads(r.stdout)["checks"] if c["name"] == "golden")
    assert not golden["passed"] and "rendered image differs" in golden["detail"]


def test_the_model_server_gates_with_the_spectrum_backend_that_serves(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The server opens one spectrum backend per run (logged once) and the golden gate of
    every model it loads (start-up and OTA prepare) checks that very backend."""
    import inference.golden_path as golden_path
    import inference.spectrum.backends as spectrum_backends
    from deploy.config import InferenceConfig
    from deploy.serving import ModelServer

    opened: list[str] = []
    factories = dict(spectrum_backends._FACTORIES)
    for name, factory in factories.items():

        def counting(factory: Any = factory, name: str = name) -> Any:
            opened.append(name)
            return factory()

        monkeypatch.setitem(spectrum_backends._FACTORIES, name, counting)
    monkeypatch.setattr(spectrum_backends, "_make_numpy", spectrum_backends._FACTORIES["numpy"])
    monkeypatch.setattr(spectrum_backends, "_make_cuda", spectrum_backends._FACTORIES["cuda"])
    gated: list[object] = []
    check = golden_path.check_device_path

    def spy(backend: Any, bundle: Bundle, spectrum: Any = "auto") -> Any:
        gated.append(spectrum)
        return check(backend, bundle, spectrum)

    monkeypatch.setattr(golden_path, "check_device_path", spy)
    import inference.golden as golden

    monkeypatch.setattr(golden, "check_device_path", spy)
    first = make_plain_bundle(tmp_path / "b1", seed=1)
    second = make_plain_bundle(tmp_path / "b2", seed=2)
    config = InferenceConfig(backend="onnxruntime", spectrum_backend="numpy")
    server = ModelServer(first.root, tmp_path / "state", config)
    caplog.set_level("INFO")
    try:
        server.open()
        server.prepare(second)  # an OTA candidate, gated beside the serving model
        spectra = server._spectra
    finally:
        server.close()
    assert opened == ["numpy"], opened
    assert len(gated) == 2 and all(g is spectra for g in gated), gated
    logged = [r.getMessage() for r in caplog.records if "spectrum backend" in r.getMessage()]
    assert len(logged) == 1, logged
