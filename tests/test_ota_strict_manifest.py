"""Strict manifest: odd versions, malformed golden arrays and bundles the device cannot run are
refused by ``omis ota install`` with one clear line, and nothing is left behind.

The bundles are correctly signed: the signature covers whatever the manifest says, so these
checks are the only thing between a signed mistake and the serving model.
"""

from __future__ import annotations

import io
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from ota_support import Edit, install_cli, make_bundle, make_keys, resigned, set_key

from deploy.ota import GoldenGate, Installer, ModelStore, TrustStore
from deploy.ota.exceptions import RejectedError


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return make_keys(tmp_path_factory.mktemp("keys"))


@pytest.fixture
def device(tmp_path: Path, keys: tuple[Path, Path]) -> Path:
    """A state dir serving v2, trusting the key."""
    state = tmp_path / "state"
    TrustStore(state).add(keys[1])
    Installer(ModelStore(state), TrustStore(state), GoldenGate(backend="onnxruntime")).install(
        make_bundle(tmp_path / "v2", 2, key=keys[0])
    )
    return state


def _npy(name: str, writer: Callable[[Path], None]) -> Edit:
    def edit(root: Path, raw: dict[str, Any]) -> None:
        writer(root / name)

    return edit


def _pickled(path: Path) -> None:
    np.save(path, np.array([{"a": 1}], dtype=object), allow_pickle=True)


def _garbage(path: Path) -> None:
    path.write_bytes(b"\x93NUMPY this is not an array")


def _as(dtype: str) -> Callable[[Path], None]:
    def write(path: Path) -> None:
        np.save(path, np.load(path).astype(dtype))

    return write


def _reshaped(path: Path) -> None:
    arr = np.load(path)
    np.save(path, arr.reshape(arr.shape[0], -1))


def _nan(path: Path) -> None:
    arr = np.load(path)
    arr.flat[0] = np.nan
    np.save(path, arr)


def _npz(path: Path) -> None:
    buf = io.BytesIO()
    np.savez(buf, x=np.load(path))
    path.write_bytes(buf.getvalue())


CASES: list[tuple[str, Edit, str]] = [
    ("version string", set_key("version", "3"), "version: Input should be a valid integer"),
    ("version float", set_key("version", 3.0), "version: Input should be a valid integer"),
    ("version bool", set_key("version", True), "version: Input should be a valid integer"),
    ("version 10**30", set_key("version", 10**30), "version: Input should be less than"),
    ("version zero", set_key("version", 0), "version: Input should be greater than or equal to 1"),
    ("std zero", set_key("input.normalization.std", [0.2, 0.0, 0.2]), "std.1"),
    ("threshold string", set_key("thresholds.decision", "0.5"), "thresholds.decision"),
    ("unknown key", set_key("surprise", 1), "surprise: Extra inputs are not permitted"),
    ("created", set_key("created", "yesterday"), "created: String should match pattern"),
    ("classes twice", set_key("classes", ["low", "low"]), "classes must be distinct"),
    ("golden fields", set_key("golden.fields", 99), "golden.fields: Input should be less"),
    ("unknown algorithm", set_key("spectrum.algorithm", "omis-magic-v9"), "unknown spectrum"),
    ("render size", set_key("render.width", 64), "render size 64x16 does not match"),
    ("render off axis", set_key("render.x_range_nm", [900.0, 1000.0]), "x_range_nm"),
    ("pickled golden", _npy("golden/outputs.npy", _pickled), "golden/outputs.npy"),
    ("garbage golden", _npy("golden/inputs.npy", _garbage), "golden/inputs.npy"),
    ("float64 golden", _npy("golden/outputs.npy", _as("float64")), "expected float32"),
    ("int golden", _npy("golden/inputs.npy", _as("int32")), "expected float32"),
    ("golden shape", _npy("golden/inputs.npy", _reshaped), "golden/inputs.npy: expected"),
    ("golden NaN", _npy("golden/outputs.npy", _nan), "NaN or infinity"),
    ("golden npz", _npy("golden/outputs.npy", _npz), "golden/outputs.npy"),
]


def _leftovers(state: Path) -> dict[str, Any]:
    models = state / "models"
    st = ModelStore(state).state()
    return {
        "journal": (models / "journal.json").exists(),
        "staging": sorted(p.name for p in (models / "staging").glob("*")),
        "bundles": sorted(p.name for p in (models / "bundles").iterdir()),
        "pending": st["pending"],
        "step": st["step"],
        "current": st["current"],
    }


@pytest.mark.parametrize(("case", "edit", "reason"), CASES, ids=[c[0] for c in CASES])
def test_omis_ota_install_refuses_and_leaves_nothing(
    device: Path, tmp_path: Path, keys: tuple[Path, Path], case: str, edit: Edit, reason: str
) -> None:
    before = _leftovers(device)
    bundle = resigned(make_bundle(tmp_path / "v3", 3), keys[0], edit)
    r = install_cli(device, bundle)
    last_line = r.stderr.strip().splitlines()[-1]
    assert "Traceback" not in r.stderr and last_line.startswith("omis ota: error: "), r.stderr
    assert reason in last_line
    assert _leftovers(device) == {**before, "journal": False, "pending": None, "step": None}
    last = ModelStore(device).state()["last_outcome"]
    assert last["result"] == "rejected" and reason in last["reason"]
    active = ModelStore(device).active()
    assert active is not None and active.manifest.version == 2


def test_pickle_is_never_loaded(device: Path, tmp_path: Path, keys: tuple[Path, Path]) -> None:
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self) -> tuple[Any, ...]:
            return (Path.touch, (marker,))

    def write(path: Path) -> None:
        path.write_bytes(pickle.dumps(np.array([Evil()], dtype=object)))

    bundle = resigned(make_bundle(tmp_path / "v3", 3), keys[0], _npy("golden/outputs.npy", write))
    with pytest.raises(RejectedError, match=r"golden/outputs\.npy"):
        Installer(ModelStore(device), TrustStore(device), GoldenGate("onnxruntime")).install(bundle)
    assert not marker.exists()
