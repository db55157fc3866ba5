"""Verify before you expand: a bundle archive writes nothing its signed manifest does not sign.

Before issue 14 a 0.5 MB unsigned ``.tar.gz`` expanded to 512 MiB in staging before the
signature was checked.  Now ``manifest.json`` and ``manifest.sig`` are read first, the
signature checked, and each payload file streamed with its signed size and sha256.
"""

from __future__ import annotations

import gzip
import io
import os
import resource
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
from ota_support import make_bundle, make_keys

from deploy.ota import TrustStore
from deploy.ota.exceptions import SignatureInvalidError, UnsafeArchiveError
from deploy.ota.signing import load_public_key, manifest_verifier
from deploy.ota.unpack import verified_extract

ROOT = Path(__file__).resolve().parents[1]
BOMB_BYTES = 512 << 20


class _Zeros(io.RawIOBase):
    """``size`` zero bytes, streamed (the bomb is never held in memory)."""

    def __init__(self, size: int) -> None:
        self.left = size

    def readable(self) -> bool:
        return True

    def readinto(self, buf: memoryview) -> int:  # type: ignore[override]
        n = min(len(buf), self.left)
        buf[:n] = bytes(n)
        self.left -= n
        return n


def _add_bytes(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def bomb_archive(
    path: Path, bundle: Path | None, payload_first: bool = True, size: int = BOMB_BYTES
) -> Path:
    """A .tar.gz whose model.onnx is ``size`` zero bytes; manifest files from ``bundle``."""
    with gzip.open(path, "wb", compresslevel=9) as gz, tarfile.open(fileobj=gz, mode="w") as tf:

        def add_bomb() -> None:
            info = tarfile.TarInfo("model.onnx")
            info.size = size
            tf.addfile(info, _Zeros(size))

        if payload_first:
            add_bomb()
        if bundle is not None:
            for name in ("manifest.json", "manifest.sig"):
                if (bundle / name).exists():
                    _add_bytes(tf, name, (bundle / name).read_bytes())
        else:
            _add_bytes(tf, "manifest.json", b'{"schema": "omis.bundle/1"}')
        if not payload_first:
            add_bomb()
    return path


@pytest.fixture(scope="module")
def bomb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """0.5 MB of unsigned .tar.gz that expands to 512 MiB (made once per module)."""
    return bomb_archive(tmp_path_factory.mktemp("bomb") / "bomb.tar.gz", None)


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("keys")
    priv, pub = make_keys(d, "good")
    return {"priv": priv, "pub": pub}


def test_bomb_is_small(bomb: Path) -> None:
    assert bomb.stat().st_size < 600_000


def test_unsigned_archive_writes_nothing(tmp_path: Path, keys: dict[str, Path], bomb: Path) -> None:
    verify = manifest_verifier({"k": load_public_key(keys["pub"])})
    dest = tmp_path / "dest"
    with pytest.raises(SignatureInvalidError, match="unsigned"):
        verified_extract(bomb, dest, verify)
    assert not dest.exists()


def test_signed_manifest_with_a_swollen_payload_is_cut_off(
    tmp_path: Path, keys: dict[str, Path]
) -> None:
    bundle = make_bundle(tmp_path / "b", 3, key=keys["priv"])
    signed_size = (bundle / "model.onnx").stat().st_size
    bomb = bomb_archive(tmp_path / "bomb.tar.gz", bundle, payload_first=False, size=64 << 20)
    verify = manifest_verifier({"k": load_public_key(keys["pub"])})
    dest = tmp_path / "dest"
    with pytest.raises(UnsafeArchiveError, match="the manifest signs"):
        verified_extract(bomb, dest, verify)
    written = sum(p.stat().st_size for p in dest.rglob("*") if p.is_file())
    assert written <= 2 * signed_size + 65536


def test_payload_altered_after_signing_is_refused_as_extracted(
    tmp_path: Path, keys: dict[str, Path]
) -> None:
    bundle = make_bundle(tmp_path / "b", 3, key=keys["priv"])
    model = bytearray((bundle / "model.onnx").read_bytes())
    model[-1] ^= 0xFF
    archive = tmp_path / "altered.tar"
    with tarfile.open(archive, "w") as tf:
        for path in sorted(bundle.rglob("*")):
            rel = path.relative_to(bundle).as_posix()
            if rel == "model.onnx":
                _add_bytes(tf, rel, bytes(model))
            else:
                tf.add(path, arcname=rel, recursive=False)
    verify = manifest_verifier({"k": load_public_key(keys["pub"])})
    with pytest.raises(UnsafeArchiveError, match="sha256 differs"):
        verified_extract(archive, tmp_path / "dest", verify)


def test_good_archive_extracts_exactly_the_signed_files(
    tmp_path: Path, keys: dict[str, Path]
) -> None:
    bundle = make_bundle(tmp_path / "b", 3, key=keys["priv"])
    archive = tmp_path / "good.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        tf.add(bundle, arcname="top")
    verify = manifest_verifier({"k": load_public_key(keys["pub"])})
    root = verified_extract(archive, tmp_path / "dest", verify)
    want = sorted(p.relative_to(bundle).as_posix() for p in bundle.rglob("*") if p.is_file())
    got = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    assert got == want


def _limit_file_size() -> None:
    limit = 64 << 20  # writing more than this kills the process (SIGXFSZ)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))


def test_ota_install_refuses_the_bomb_without_expanding_it(
    tmp_path: Path, keys: dict[str, Path], bomb: Path
) -> None:
    state = tmp_path / "state"
    TrustStore(state).add(keys["pub"])
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "deploy.cli", "ota", "install", str(bomb), "--state-dir",
         str(state)],
        capture_output=True, text=True, env=env, timeout=120, check=False,
        preexec_fn=_limit_file_size,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "unsigned" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert time.monotonic() - start < 60
    leftovers = [p for p in (state / "models").rglob("*") if p.is_file() and p.stat().st_size > 1e6]
    assert leftovers == []
