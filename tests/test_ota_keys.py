"""Keys, signatures, the trust store and key rotation."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from ota_support import make_bundle, make_keys

from deploy.ota import Installer, ModelStore, TrustStore
from deploy.ota.exceptions import RejectedError, SignatureInvalidError, TrustError
from deploy.ota.signing import (
    fingerprint,
    load_public_key,
    sign_bundle,
    verify_bundle,
)
from deploy.ota.unpack import pack_bundle
from inference.bundle import Bundle


def _no_gate(bundle: Bundle) -> None:
    """The gate is tested in test_ota_rejects."""


def _keys(pub: Path) -> dict[str, object]:
    key = load_public_key(pub)
    return {fingerprint(key): key}


def test_keygen_modes_and_refuses_overwrite(tmp_path: Path) -> None:
    priv, pub = make_keys(tmp_path, "k")
    assert stat.S_IMODE(priv.stat().st_mode) == 0o600
    assert pub.name == "k.pub" and b"PUBLIC KEY" in pub.read_bytes()
    with pytest.raises(TrustError, match="already exists"):
        make_keys(tmp_path, "k")


def test_sign_and_verify_directory_and_tar(tmp_path: Path) -> None:
    priv, pub = make_keys(tmp_path / "keys")
    b = make_bundle(tmp_path / "b", 1)
    tar = pack_bundle(b, tmp_path / "b.tar")
    sign_bundle(b, priv)
    sign_bundle(tar, priv)  # a .tar is signed in place, atomically
    for target in (b, tar):
        info = verify_bundle(target, _keys(pub))  # type: ignore[arg-type]
        assert info["version"] == 1 and info["signer"] == fingerprint(load_public_key(pub))


def test_signature_covers_every_file(tmp_path: Path) -> None:
    priv, pub = make_keys(tmp_path / "keys")
    b = make_bundle(tmp_path / "b", 1, key=priv)
    # Re-writing the manifest (e.g. to list a swapped model) breaks the signature.
    text = (b / "manifest.json").read_text().replace('"version": 1', '"version": 9')
    (b / "manifest.json").write_text(text)
    with pytest.raises(SignatureInvalidError):
        verify_bundle(b, _keys(pub))  # type: ignore[arg-type]


def test_refuses_to_sign_an_inconsistent_bundle(tmp_path: Path) -> None:
    priv, _ = make_keys(tmp_path / "keys")
    b = make_bundle(tmp_path / "b", 1)
    (b / "model.onnx").write_bytes(b"not the listed model")
    with pytest.raises(RejectedError, match=r"model\.onnx: size"):
        sign_bundle(b, priv)


def test_key_rotation(tmp_path: Path) -> None:
    old_priv, old_pub = make_keys(tmp_path / "keys", "old")
    new_priv, new_pub = make_keys(tmp_path / "keys", "new")
    state = tmp_path / "state"
    trust = TrustStore(state)
    old_fp = trust.add(old_pub)
    installer = Installer(ModelStore(state), trust, _no_gate)
    installer.install(make_bundle(tmp_path / "v1", 1, key=old_priv))
    # 1. trust the new key beside the old one
    new_fp = trust.add(new_pub)
    assert {k.fingerprint for k in trust.list()} == {old_fp, new_fp}
    # 2. sign with the new key
    installer.install(make_bundle(tmp_path / "v2", 2, key=new_priv))
    # 3. remove the old key: its signatures are no longer accepted
    assert trust.remove(old_fp[:12]) == old_fp
    with pytest.raises(SignatureInvalidError):
        installer.install(make_bundle(tmp_path / "v3", 3, key=old_priv))
    installer.install(make_bundle(tmp_path / "v4", 4, key=new_priv))
    assert ModelStore(state).state()["models"]["current"]["signer"] == new_fp


def test_trust_store_errors(tmp_path: Path) -> None:
    trust = TrustStore(tmp_path / "state")
    (tmp_path / "junk.pub").write_text("not a key")
    with pytest.raises(TrustError, match="cannot read public key"):
        trust.add(tmp_path / "junk.pub")
    with pytest.raises(TrustError, match="too short"):
        trust.remove("abc")
    with pytest.raises(TrustError, match="no trusted key"):
        trust.remove("0123456789abcdef")
    _, pub = make_keys(tmp_path / "keys")
    fp = trust.add(pub)
    assert trust.add(pub) == fp and len(trust.list()) == 1  # idempotent
    # A key file swapped under a trusted name is detected, not silently trusted.
    _, other = make_keys(tmp_path / "keys", "other")
    (trust.root / f"{fp}.pub").write_bytes(other.read_bytes())
    with pytest.raises(TrustError, match="does not match"):
        trust.keys()
