"""Identifiers that reach file names: validated by the one rule and kept under their directory.

Each identifier a peer or a file can choose and that names a file is tried with hostile shapes:
OTA correlation ids (the archive), transfer ids (the chunk directory), installed slot
directories (read back from ``state.json``), engine cache stems and key names.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from ota_support import make_bundle, make_keys

from deploy.appliance.ota_transfer import OtaReceiver, TransferSettings
from deploy.ota import Installer, ModelStore, TrustStore
from deploy.ota.delivery import (
    ChunkAssembler,
    InlineSource,
    chunk_topic,
    inline_source,
    iter_chunks,
    make_offer,
    precheck_offer,
)
from deploy.ota.exceptions import DeliveryError, OtaError, StoreError, TrustError
from deploy.ota.signing import generate_keypair
from deploy.ota.store import Slot
from deploy.ota.unpack import pack_bundle
from firmware_bridge.exceptions import InputError
from firmware_bridge.paths import safe_join
from inference.bundle import Bundle

HOSTILE = [
    "../../../x/evil",
    "../evil",
    "..",
    ".",
    "",
    "/etc/passwd",
    "a/b",
    "a\\b",
    "a\x00b",
    "ok\n",
    ".hidden",
    "x" * 65,
    "~root",
    "é",
]


def _no_gate(bundle: Bundle) -> None:
    """The gate is tested elsewhere."""


@pytest.fixture(scope="module")
def kit(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("paths")
    priv, pub = make_keys(d / "keys")
    out = {"pub": pub}
    for v in (1, 2, 3):
        out[f"v{v}"] = pack_bundle(make_bundle(d / f"v{v}", v, key=priv), d / f"v{v}.tar")
    return out


def _files_under(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file()}


@pytest.mark.parametrize("name", HOSTILE)
def test_safe_join_refuses_every_name_that_is_not_an_identifier(tmp_path: Path, name: str) -> None:
    with pytest.raises(InputError) as err:
        safe_join(tmp_path, name, ".tar", what="correlation_id")
    assert "correlation_id" in str(err.value) and "\n" not in str(err.value).strip()


def test_safe_join_refuses_a_link_out_of_its_base(tmp_path: Path) -> None:
    base = tmp_path / "base"
    base.mkdir()
    (base / "planted.tar").symlink_to(tmp_path / "outside.tar")
    with pytest.raises(InputError, match="outside"):
        safe_join(base, "planted", ".tar")
    assert safe_join(base, "fine-1.2_x", ".tar") == base / "fine-1.2_x.tar"


def _device(tmp_path: Path, kit: dict[str, Path]) -> Path:
    state = tmp_path / "root" / "state"
    TrustStore(state).add(kit["pub"])
    Installer(ModelStore(state), TrustStore(state), _no_gate).install(kit["v1"])
    return state


@pytest.mark.parametrize("cid", ["../../../x/evil", "../evil", "/tmp/evil", "a/../../b"])
def test_offer_with_a_traversing_correlation_id_is_refused_before_download(
    tmp_path: Path, kit: dict[str, Path], cid: str
) -> None:
    state = _device(tmp_path, kit)
    src = inline_source(kit["v2"], "transfer-evil1", chunk_size=4096)
    offer = make_offer(kit["v2"], src, cid)
    with pytest.raises(DeliveryError, match="correlation_id"):
        precheck_offer(offer, TrustStore(state), ModelStore(state), "0.1.0")
    # The receiver itself never writes outside its directory either (defence in depth).
    before = _files_under(tmp_path)
    rx = OtaReceiver(state / "ota", TransferSettings(0.2, 5.0, 5.0), lambda t, p: None, "p", "d")
    rx.expect(offer)
    for index, data in iter_chunks(kit["v2"], src.chunk_size):
        rx.on_chunk(chunk_topic("p", "d", src.transfer_id, index), data)
    with pytest.raises(DeliveryError, match="correlation_id"):
        rx.receive(offer, threading.Event().is_set)
    assert _files_under(tmp_path) - before == set()


def test_rejected_transfer_leaves_no_partial_files(tmp_path: Path, kit: dict[str, Path]) -> None:
    """The chunks carry v3's archive, the offer signs v2's manifest: refused, nothing kept."""
    state = _device(tmp_path, kit)
    src = inline_source(kit["v3"], "transfer-swap1", chunk_size=4096)
    offer = make_offer(kit["v2"], src, "c-swap")
    precheck_offer(offer, TrustStore(state), ModelStore(state), "0.1.0")
    work = state / "ota"
    rx = OtaReceiver(work, TransferSettings(0.2, 5.0, 5.0), lambda t, p: None, "p", "d")
    rx.expect(offer)
    for index, data in iter_chunks(kit["v3"], src.chunk_size):
        rx.on_chunk(chunk_topic("p", "d", src.transfer_id, index), data)
    with pytest.raises(OtaError, match="manifest"):
        rx.receive(offer, threading.Event().is_set)
    assert _files_under(work) == set()


@pytest.mark.parametrize("transfer", ["../../escape", "a/b", ".."])
def test_chunk_directory_stays_under_its_work_dir(tmp_path: Path, transfer: str) -> None:
    src = InlineSource.model_construct(
        transfer_id=transfer, size=10, sha256="0" * 64, chunk_size=1024
    )
    with pytest.raises(DeliveryError, match="transfer"):
        ChunkAssembler(tmp_path / "chunks", src).add(0, b"x" * 10)
    assert _files_under(tmp_path) == set()


@pytest.mark.parametrize("slot_dir", ["../../outside", "/etc", "..", "v1/../../x"])
def test_slot_directory_from_the_state_file_stays_in_the_store(
    tmp_path: Path, slot_dir: str
) -> None:
    store = ModelStore(tmp_path / "state")
    slot = Slot.model_construct(dir=slot_dir, sha256="", manifest_sha256="", signer="")
    with pytest.raises(StoreError, match="slot"):
        store.bundle_path(slot)


@pytest.mark.parametrize("name", ["../evil", "a/b", ".x", "x" * 65])
def test_key_names_stay_in_the_key_directory(tmp_path: Path, name: str) -> None:
    with pytest.raises(TrustError):
        generate_keypair(tmp_path / "keys", name)
    assert not any(p.is_file() for p in tmp_path.rglob("*"))


def test_engine_cache_paths_stay_in_the_cache(tmp_path: Path) -> None:
    from inference.engine_cache import EngineCache, EngineKey
    from inference.exceptions import EngineError

    key = EngineKey("ab" * 32, "10", "gpu", "8.7", "../../fp16", (1,), (1,), (1,))
    cache = EngineCache(tmp_path)
    with pytest.raises(EngineError, match="precision"):
        cache.store(key, b"plan")
    assert not any(p.is_file() for p in tmp_path.rglob("*"))
