"""Offers, chunked transfer and downloads, transport-free.

The daemon's receiving path (offer -> chunks over a real mosquitto -> need -> install) is tested
end to end in ``test_ota_daemon.py`` (inline publish, lost chunk, rejected offers, counts).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from ota_support import make_bundle, make_keys

from deploy.ota import Installer, ModelStore, TrustStore
from deploy.ota.delivery import (
    ChunkAssembler,
    InlineSource,
    PathSource,
    UrlSource,
    fetch_url,
    inline_source,
    iter_chunks,
    make_offer,
    parse_offer,
    precheck_offer,
)
from deploy.ota.exceptions import DeliveryError, DowngradeError, SignatureInvalidError
from deploy.ota.unpack import pack_bundle
from inference.bundle import Bundle


def _no_gate(bundle: Bundle) -> None:
    """The gate is tested in test_ota_rejects."""


@pytest.fixture(scope="module")
def kit(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("delivery")
    priv, pub = make_keys(d / "keys")
    other, _ = make_keys(d / "keys", "other")
    out = {"pub": pub, "other": other}
    for v in (1, 2):
        out[f"v{v}"] = pack_bundle(make_bundle(d / f"v{v}", v, key=priv), d / f"v{v}.tar")
    return out


def _device(tmp_path: Path, kit: dict[str, Path]) -> Path:
    state = tmp_path / "state"
    TrustStore(state).add(kit["pub"])
    Installer(ModelStore(state), TrustStore(state), _no_gate).install(kit["v1"])
    return state


def _precheck(state: Path, payload: bytes) -> None:
    """What the daemon's ``cmd/ota`` handler runs on an offer (before any download)."""
    precheck_offer(parse_offer(payload), TrustStore(state), ModelStore(state), "0.1.0")


def test_offer_roundtrip_and_validation(kit: dict[str, Path]) -> None:
    offer = make_offer(kit["v2"], PathSource(path="/data/v2.tar"), "c1")
    again = parse_offer(offer.to_json())
    assert again == offer and again.manifest_bytes().startswith(b"{")
    with pytest.raises(DeliveryError, match="source"):
        parse_offer(offer.to_json().replace(b'"path"', b'"ftp"', 1))
    bad = json.loads(offer.to_json())
    bad["source"] = {"kind": "url", "url": "http://plain/x.tar", "size": 1, "sha256": "0" * 64}
    with pytest.raises(DeliveryError, match="url"):
        parse_offer(json.dumps(bad).encode())


def test_replayed_or_untrusted_offer_refused_before_download(
    tmp_path: Path, kit: dict[str, Path]
) -> None:
    state = _device(tmp_path, kit)
    replay = make_offer(kit["v1"], PathSource(path=str(kit["v1"])), "c2")
    with pytest.raises(DowngradeError, match="already installed"):
        _precheck(state, replay.to_json())
    forged = json.loads(make_offer(kit["v2"], PathSource(path="/x"), "c3").to_json())
    forged["signature"] = forged["signature"][:-4] + "AAA="
    with pytest.raises(SignatureInvalidError):
        _precheck(state, json.dumps(forged).encode())
    _precheck(state, make_offer(kit["v2"], PathSource(path="/x"), "c4").to_json())


def test_chunks_resume_after_restart_and_detect_corruption(
    tmp_path: Path, kit: dict[str, Path]
) -> None:
    src = inline_source(kit["v2"], "transfer-0001", chunk_size=1024)
    chunks = dict(iter_chunks(kit["v2"], src.chunk_size))
    first = ChunkAssembler(tmp_path, src)
    for i in list(chunks)[::2]:
        first.add(i, chunks[i])
    # a new process picks up what is on disk and asks for the rest
    second = ChunkAssembler(tmp_path, src)
    assert second.missing() == list(chunks)[1::2]
    assert json.loads(second.need_payload())["missing"] == second.missing()
    with pytest.raises(DeliveryError, match="out of range"):
        second.add(src.chunks, b"x")
    with pytest.raises(DeliveryError, match="bytes, expected"):
        second.add(1, b"short")
    for i in second.missing():
        second.add(i, chunks[i])
    out = second.assemble(tmp_path / "got.tar")
    assert out.read_bytes() == kit["v2"].read_bytes()
    wrong = InlineSource(**{**src.model_dump(), "sha256": "f" * 64})
    asm = ChunkAssembler(tmp_path / "w", wrong)
    for i, data in chunks.items():
        asm.add(i, data)
    with pytest.raises(DeliveryError, match="corrupt"):
        asm.assemble(tmp_path / "bad.tar")
    assert asm.missing() == list(chunks)  # corrupt chunks are dropped, to be sent again
    assert not (tmp_path / "bad.tar").exists()


def test_fetch_refuses_plain_http_and_bad_tls(tmp_path: Path) -> None:
    src = UrlSource.model_construct(url="http://example.invalid/x.tar", size=10, sha256="0" * 64)
    with pytest.raises(DeliveryError, match="https"):
        fetch_url(src, tmp_path / "x.tar")
    # nothing listens on this port: the failure is reported and leaves no file behind
    src = UrlSource(url="https://127.0.0.1:9/x.tar", size=10, sha256="0" * 64)
    with pytest.raises(DeliveryError, match="download"):
        fetch_url(src, tmp_path / "x.tar", timeout=2)
    assert list(tmp_path.iterdir()) == []
