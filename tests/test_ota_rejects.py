"""Every bad bundle is refused with a clear reason, and the serving model does not change."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from ota_support import bundle_members, make_bundle, make_keys, tar_with_members

from deploy.ota import GoldenGate, Installer, InstallOptions, ModelStore, TrustStore
from deploy.ota.exceptions import (
    DowngradeError,
    IncompatibleError,
    ModelCheckError,
    RejectedError,
    SignatureInvalidError,
    UnsafeArchiveError,
)
from deploy.ota.unpack import UnpackLimits, pack_bundle
from inference.bundle import Bundle
from inference.exceptions import EngineError

GATE = GoldenGate(backend="onnxruntime")


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("keys")
    priv, pub = make_keys(d, "good")
    other, _ = make_keys(d, "other")
    return {"priv": priv, "pub": pub, "other": other}


@pytest.fixture
def device(tmp_path: Path, keys: dict[str, Path]) -> Path:
    """A state dir serving v2 (with v1 as previous), trusting the good key."""
    state = tmp_path / "state"
    TrustStore(state).add(keys["pub"])
    installer = Installer(ModelStore(state), TrustStore(state), GATE)
    for v in (1, 2):
        installer.install(make_bundle(tmp_path / f"v{v}", v, key=keys["priv"]))
    return state


def _snapshot(state: Path) -> dict[str, Any]:
    st = ModelStore(state).state()
    models = state / "models"
    return {
        "current": st["models"]["current"],
        "previous": st["models"]["previous"],
        "generation": st["generation"],
        "bundles": sorted(p.name for p in (models / "bundles").iterdir()),
    }


def _signed_v3(tmp: Path, keys: dict[str, Path], **kw: Any) -> Path:
    return make_bundle(tmp / "v3", 3, key=keys["priv"], **kw)


def _bad_signature(tmp: Path, keys: dict[str, Path]) -> Path:
    b = _signed_v3(tmp, keys)
    sig = bytearray((b / "manifest.sig").read_bytes())
    sig[10] ^= 0xFF
    (b / "manifest.sig").write_bytes(bytes(sig))
    return b


def _unknown_key(tmp: Path, keys: dict[str, Path]) -> Path:
    return make_bundle(tmp / "v3", 3, key=keys["other"])


def _unsigned(tmp: Path, keys: dict[str, Path]) -> Path:
    return make_bundle(tmp / "v3", 3)


def _tampered(tmp: Path, keys: dict[str, Path]) -> Path:
    b = _signed_v3(tmp, keys)
    data = bytearray((b / "golden/inputs.npy").read_bytes())
    data[-1] ^= 0x01  # same size, different bytes
    (b / "golden/inputs.npy").write_bytes(bytes(data))
    return b


def _missing(tmp: Path, keys: dict[str, Path]) -> Path:
    b = _signed_v3(tmp, keys)
    (b / "golden/outputs.npy").unlink()
    return b


def _extra(tmp: Path, keys: dict[str, Path]) -> Path:
    b = _signed_v3(tmp, keys)
    (b / "extra.bin").write_bytes(b"surprise")
    return b


def _tar_plus(extra: tuple[str, str, bytes]) -> Callable[[Path, dict[str, Path]], Path]:
    def build(tmp: Path, keys: dict[str, Path]) -> Path:
        b = _signed_v3(tmp, keys)
        return tar_with_members(tmp / "v3.tar", [*bundle_members(b), extra])

    return build


def _truncated(tmp: Path, keys: dict[str, Path]) -> Path:
    b = _signed_v3(tmp, keys)
    tar = pack_bundle(b, tmp / "v3.tar")
    data = tar.read_bytes()
    model = (b / "model.onnx").read_bytes()
    cut = data.index(model) + len(model) // 2  # in the middle of a member's data
    tar.write_bytes(data[:cut])
    return tar


def _oversize(tmp: Path, keys: dict[str, Path]) -> Path:
    return pack_bundle(_signed_v3(tmp, keys), tmp / "v3.tar")


def _downgrade(tmp: Path, keys: dict[str, Path]) -> Path:
    return make_bundle(tmp / "v1again", 1, key=keys["priv"])


def _replay(tmp: Path, keys: dict[str, Path]) -> Path:
    return tmp / "v2"  # the very bundle that is installed, offered again


def _too_new_app(tmp: Path, keys: dict[str, Path]) -> Path:
    return _signed_v3(tmp, keys, min_app_version="99.0.0")


def _bad_golden(tmp: Path, keys: dict[str, Path]) -> Path:
    return _signed_v3(tmp, keys, bad_golden=True)


def _engine_fails(bundle: Bundle) -> None:
    raise EngineError("TensorRT builder returned no engine")


CASES: list[tuple[str, Callable[[Path, dict[str, Path]], Path], type[Exception], str]] = [
    ("bad signature", _bad_signature, SignatureInvalidError, "verifies against none"),
    ("unknown key", _unknown_key, SignatureInvalidError, "verifies against none"),
    ("unsigned", _unsigned, SignatureInvalidError, "unsigned bundle"),
    ("tampered file", _tampered, RejectedError, "golden/inputs.npy: sha256 differs"),
    ("missing file", _missing, RejectedError, "missing listed file(s): golden/outputs.npy"),
    ("extra file", _extra, RejectedError, "unlisted file(s): extra.bin"),
    ("traversal", _tar_plus(("file", "../evil", b"x")), UnsafeArchiveError, "path traversal"),
    ("absolute path", _tar_plus(("file", "/tmp/evil", b"x")), UnsafeArchiveError, "absolute"),
    ("symlink", _tar_plus(("symlink", "link", b"/etc/passwd")), UnsafeArchiveError, "links"),
    ("hardlink", _tar_plus(("hardlink", "hl", b"model.onnx")), UnsafeArchiveError, "links"),
    ("fifo", _tar_plus(("fifo", "pipe", b"")), UnsafeArchiveError, "not a regular file"),
    ("truncated", _truncated, UnsafeArchiveError, "truncated"),
    ("oversize", _oversize, UnsafeArchiveError, "cap"),
    ("downgrade", _downgrade, DowngradeError, "older than the current one"),
    ("replay", _replay, DowngradeError, "already installed"),
    ("min_app_version", _too_new_app, IncompatibleError, "needs application >= 99.0.0"),
    ("golden mismatch", _bad_golden, ModelCheckError, "golden outputs not reproduced"),
]


@pytest.mark.parametrize(("case", "build", "error", "reason"), CASES, ids=[c[0] for c in CASES])
def test_rejected_without_change(
    device: Path,
    tmp_path: Path,
    keys: dict[str, Path],
    case: str,
    build: Callable[[Path, dict[str, Path]], Path],
    error: type[Exception],
    reason: str,
) -> None:
    before = _snapshot(device)
    source = build(tmp_path, keys)
    limits = UnpackLimits(max_file_bytes=256) if case == "oversize" else UnpackLimits()
    installer = Installer(ModelStore(device), TrustStore(device), GATE)
    with pytest.raises(error, match=None) as info:
        installer.install(source, InstallOptions(limits=limits))
    assert reason in str(info.value)
    assert _snapshot(device) == before
    st = ModelStore(device).state()
    assert st["last_outcome"]["result"] == "rejected"
    assert reason in st["last_outcome"]["reason"]
    assert st["pending"] is None and st["step"] is None
    assert list((device / "models" / "staging").iterdir()) == []
    assert not (tmp_path / "evil").exists() and not (device / "models" / "evil").exists()
    active = ModelStore(device).active()
    assert active is not None and active.manifest.version == 2


def test_engine_build_failure_through_the_seam(
    device: Path, tmp_path: Path, keys: dict[str, Path]
) -> None:
    before = _snapshot(device)
    installer = Installer(ModelStore(device), TrustStore(device), _engine_fails)
    with pytest.raises(ModelCheckError, match="TensorRT builder returned no engine"):
        installer.install(_signed_v3(tmp_path, keys))
    assert _snapshot(device) == before


def test_downgrade_allowed_by_local_operator(
    device: Path, tmp_path: Path, keys: dict[str, Path]
) -> None:
    installer = Installer(ModelStore(device), TrustStore(device), GATE)
    result = installer.install(_downgrade(tmp_path, keys), InstallOptions(allow_downgrade=True))
    assert result.model["version"] == 1
    assert ModelStore(device).state()["previous"] == 2


def test_tar_bundle_installs(device: Path, tmp_path: Path, keys: dict[str, Path]) -> None:
    tar = pack_bundle(_signed_v3(tmp_path, keys), tmp_path / "v3.tar")
    shutil.rmtree(tmp_path / "v3")
    Installer(ModelStore(device), TrustStore(device), GATE).install(tar)
    st = ModelStore(device).state()
    assert (st["current"], st["previous"]) == (3, 2)
