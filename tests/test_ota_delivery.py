"""Offers, chunked transfer, downloads, and an end-to-end inline transfer over a real mosquitto."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from ota_support import make_bundle, make_keys
from paho.mqtt.enums import CallbackAPIVersion

from deploy.broker import EmbeddedBroker, find_mosquitto
from deploy.ota import Installer, ModelStore, TrustStore
from deploy.ota.delivery import (
    ChunkAssembler,
    InlineSource,
    OtaReceiver,
    PathSource,
    UrlSource,
    chunk_topic,
    fetch_url,
    inline_source,
    iter_chunks,
    make_offer,
    need_topic,
    parse_offer,
)
from deploy.ota.exceptions import DeliveryError, DowngradeError, SignatureInvalidError
from deploy.ota.sender import OfferSender
from deploy.ota.unpack import pack_bundle
from inference.bundle import Bundle

PREFIX = "omis/v1"


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


def _device(tmp_path: Path, kit: dict[str, Path]) -> tuple[Path, OtaReceiver]:
    state = tmp_path / "state"
    TrustStore(state).add(kit["pub"])
    Installer(ModelStore(state), TrustStore(state), _no_gate).install(kit["v1"])
    rx = OtaReceiver(tmp_path / "ota", TrustStore(state), ModelStore(state), "0.1.0")
    return state, rx


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
    _, rx = _device(tmp_path, kit)
    replay = make_offer(kit["v1"], PathSource(path=str(kit["v1"])), "c2")
    with pytest.raises(DowngradeError, match="already installed"):
        rx.offer(replay.to_json())
    forged = json.loads(make_offer(kit["v2"], PathSource(path="/x"), "c3").to_json())
    forged["signature"] = forged["signature"][:-4] + "AAA="
    with pytest.raises(SignatureInvalidError):
        rx.offer(json.dumps(forged).encode())


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


class _Device:
    """A minimal device loop over paho: offer -> chunks (dropping one once) -> need -> install."""

    def __init__(self, port: int, rx: OtaReceiver, installer: Installer) -> None:
        self.rx, self.installer = rx, installer
        self.base = f"{PREFIX}/dev1"
        self.dropped: set[int] = set()
        self.done = threading.Event()
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id="dev1")
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.subscribe([(f"{self.base}/cmd/ota", 1), (f"{self.base}/ota/chunk/#", 1)])
        self.client.loop_start()

    def _reply(self, data: dict[str, object]) -> None:
        self.client.publish(f"{self.base}/cmd/ota/reply", json.dumps(data), qos=1)

    def _on_message(self, client: paho.Client, userdata: object, msg: paho.MQTTMessage) -> None:
        if msg.topic.endswith("/cmd/ota"):
            self.rx.offer(bytes(msg.payload))
            return
        index = int(msg.topic.rsplit("/", 1)[1])
        if index == 1 and not self.dropped:
            self.dropped.add(index)  # lose one chunk: the device must ask for it again
            return
        offer = self.rx.current
        assert offer is not None and isinstance(offer.source, InlineSource)
        archive = self.rx.chunk(msg.topic, bytes(msg.payload))
        if archive is None and index == offer.source.chunks - 1:
            topic = need_topic(PREFIX, "dev1", offer.source.transfer_id)
            client.publish(topic, self.rx.need_payload(), qos=1)
        if archive is not None:
            # The daemon would hand this to its OTA worker; a direct call is fine here.
            result = self.installer.install(archive)
            self._reply({"correlation_id": offer.correlation_id, "ok": True, **result.to_dict()})
            self.done.set()

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.mark.skipif(find_mosquitto() is None, reason="mosquitto is not installed")
def test_inline_transfer_end_to_end(tmp_path: Path, kit: dict[str, Path]) -> None:
    state, rx = _device(tmp_path, kit)
    installer = Installer(ModelStore(state), TrustStore(state), _no_gate)
    with EmbeddedBroker() as broker:
        port = broker.address.port
        assert port is not None
        device = _Device(port, rx, installer)
        try:
            src = inline_source(kit["v2"], "t-0000002", chunk_size=2048)
            offer = make_offer(kit["v2"], src, "corr-42")
            with OfferSender(broker.address, PREFIX, "dev1") as sender:
                sender.connect()
                reply = sender.deliver(offer, kit["v2"], wait_s=20)
        finally:
            device.close()
    assert reply["ok"] is True and reply["correlation_id"] == "corr-42"
    assert device.dropped == {1}
    assert ModelStore(state).state()["current"] == 2
    assert chunk_topic(PREFIX, "dev1", "t-0000002", 3) == f"{PREFIX}/dev1/ota/chunk/t-0000002/3"
