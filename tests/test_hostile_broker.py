"""Fleet security against a real mosquitto: the shipped configuration and the appliance.

* Identity comes from the client certificate: a certificate issued to ``scope-02`` cannot act
  as ``scope-01`` whatever user name and password it shows; a certificate from another CA
  naming ``scope-01`` does not even complete the handshake; the legitimate device works.
* Service accounts cannot publish results (nor status) even under ``omis/v1/svc.*/``.
* Replies go where they may: a response topic under ``<prefix>/<device>/reply/<user>/`` gets
  a copy that the requester can read under the production ACL; anything else (the device's
  own ``result``) gets nothing but the standard ``cmd/<verb>/reply``.
* Commands are bounded before parsing: 10 KB of nested brackets gets a ``too_deep`` reply.

Certificates are made by the test with the ``cryptography`` package (dev_broker.py and below).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from broker_support import (
    Collector,
    FakeScanner,
    Mosquitto,
    app_config,
    mosquitto_fixture,  # noqa: F401 - the "mosquitto" fixture
    publish,
    running_appliance,
    wait_until,
)
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from deploy_support import (
    DASHBOARD_PORT,
    DEVICE_PORT,
    Peer,
    RunningBroker,
    dev_broker_module,
    wait_for,
)
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from deploy.appliance.service import Appliance
from deploy.broker import find_mosquitto, free_port
from deploy.config import load_config
from deploy.schemas import validate

pytestmark = pytest.mark.skipif(find_mosquitto() is None, reason="mosquitto is not installed")
NOT_AUTHORIZED = 135
PREFIX = "omis/v1"


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningBroker]:
    tree = dev_broker_module().build_dev_broker(
        tmp_path_factory.mktemp("hostile-broker") / "tree",
        devices={"scope-01": "pw-01", "scope-02": "pw-02"},
        users={"operator": "pw-op", "dashboard": "pw-dash"},
        services={"svc.ingest": "pw-ingest", "svc.ota": "pw-ota"},
        ports={DEVICE_PORT: free_port(), DASHBOARD_PORT: free_port()},
    )
    running = RunningBroker(tree).start()
    yield running
    running.stop()


@pytest.fixture
def peers() -> Iterator[list[Peer]]:
    made: list[Peer] = []
    yield made
    for peer in made:
        peer.close()


def connect(broker: RunningBroker, peers: list[Peer], *args: Any, **kwargs: Any) -> Peer:
    peer = Peer(broker, *args, **kwargs).connect()
    peers.append(peer)
    assert peer.connected.is_set(), f"CONNACK {peer.connack}\n{broker.log_text()[-800:]}"
    return peer


# -- identity ---------------------------------------------------------------------------------


def test_another_devices_password_does_not_make_an_identity(
    broker: RunningBroker, peers: list[Peer]
) -> None:
    victim_listener = connect(broker, peers, "svc.ingest", None, cert="svc.ingest")
    victim_listener.subscribe(f"{PREFIX}/scope-01/#")
    # scope-02's certificate with scope-01's user name and password
    impostor = connect(broker, peers, "scope-01", "pw-01", cert="scope-02")
    for leaf in ("result", "status", "availability", "cmd/scan/reply"):
        assert not impostor.publish_ok(f"{PREFIX}/scope-01/{leaf}", b"forged"), leaf
    impostor.subscribe(f"{PREFIX}/scope-01/cmd/+")
    operator = connect(broker, peers, "operator", "pw-op", websockets=True)
    assert operator.publish_ok(f"{PREFIX}/scope-01/cmd/scan", b'{"slide_id": "S1"}')
    time.sleep(0.5)
    assert impostor.received(f"{PREFIX}/scope-01/cmd/scan") == []
    assert victim_listener.received(f"{PREFIX}/scope-01/result") == []
    # what it may do is act as scope-02, the name on its certificate
    assert impostor.publish_ok(f"{PREFIX}/scope-02/result", b"{}")


def test_legitimate_device_works_with_any_or_no_password(
    broker: RunningBroker, peers: list[Peer]
) -> None:
    ingest = connect(broker, peers, "svc.ingest", "wrong", cert="svc.ingest")
    ingest.subscribe(f"{PREFIX}/+/result")
    for name, password in (("scope-01", "pw-01"), (None, None), ("whoever", "x")):
        device = connect(broker, peers, name, password, cert="scope-01")
        assert device.publish_ok(f"{PREFIX}/scope-01/result", b"r")
    assert wait_for(lambda: len(ingest.received(f"{PREFIX}/scope-01/result")) == 3, 5)


def _foreign_cert(tmp_path: Path, common_name: str) -> tuple[Path, Path]:
    """A self-signed client certificate naming ``common_name``: not from the fleet CA."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "forged.crt", tmp_path / "forged.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def test_certificate_from_another_ca_is_refused(broker: RunningBroker, tmp_path: Path) -> None:
    cert, key = _foreign_cert(tmp_path, "scope-01")
    clients = broker.tree.clients
    assert isinstance(clients, dict)
    clients["forged-scope-01"] = type(clients["scope-01"])("scope-01", cert, key)
    peer = Peer(broker, "scope-01", "pw-01", cert="forged-scope-01")
    try:
        peer.connect(timeout=3)
        assert not peer.connected.is_set()
        assert peer.connack is None, "the TLS handshake must fail before any CONNACK"
    finally:
        peer.close()


@pytest.mark.parametrize("service", ["svc.ingest", "svc.ota"])
def test_service_accounts_cannot_publish_results(
    broker: RunningBroker, peers: list[Peer], service: str
) -> None:
    ingest = connect(broker, peers, "svc.ingest", None, cert="svc.ingest")
    ingest.subscribe(f"{PREFIX}/+/result")
    account = connect(broker, peers, service, None, cert=service)
    for leaf in ("result", "status", "availability", "metrics", "ota/state"):
        assert not account.publish_ok(f"{PREFIX}/{service}/{leaf}", b"{}"), leaf
    assert not account.publish_ok(f"{PREFIX}/scope-01/result", b"{}")
    time.sleep(0.3)
    assert ingest.received(f"{PREFIX}/{service}/result") == []
    if service == "svc.ota":  # its own job still works
        assert account.publish_ok(f"{PREFIX}/scope-01/cmd/ota", b"{}")


def test_receipts_under_the_production_acl(broker: RunningBroker, peers: list[Peer]) -> None:
    """Only the archive (svc.ingest) sends receipts; each device reads only its own."""
    own = connect(broker, peers, "scope-01", "pw-01", cert="scope-01")
    own.subscribe(f"{PREFIX}/scope-01/receipt")
    other = connect(broker, peers, "scope-02", "pw-02", cert="scope-02")
    other.subscribe(f"{PREFIX}/scope-01/receipt")
    other.subscribe(f"{PREFIX}/+/receipt")
    ingest = connect(broker, peers, "svc.ingest", None, cert="svc.ingest")
    assert ingest.publish_ok(f"{PREFIX}/scope-01/receipt", b"r-1")
    # a device can forge no receipt: a forged one would delete a result never stored
    assert not other.publish_ok(f"{PREFIX}/scope-01/receipt", b"forged")
    assert not own.publish_ok(f"{PREFIX}/scope-01/receipt", b"forged")
    assert wait_for(lambda: own.received(f"{PREFIX}/scope-01/receipt") == [b"r-1"], 5)
    ingest.publish_ok(f"{PREFIX}/scope-02/receipt", b"r-2")  # scope-02's own: it may read it
    assert wait_for(lambda: other.received(f"{PREFIX}/scope-02/receipt") == [b"r-2"], 5)
    assert other.received(f"{PREFIX}/scope-01/receipt") == []
    assert own.received(f"{PREFIX}/scope-01/receipt") == [b"r-1"]


# -- replies under the production ACL -----------------------------------------------------------


@contextlib.contextmanager
def tls_appliance(broker: RunningBroker, state_dir: Path, device: str) -> Iterator[Appliance]:
    tree = broker.tree
    client = tree.clients[device]
    overrides = app_config(f"mqtts://localhost:{tree.device_port}", device=device)
    overrides["mqtt"]["tls"] = {
        "ca_file": str(tree.ca_cert),
        "cert_file": str(client.cert),
        "key_file": str(client.key),
    }
    app = Appliance(load_config(environ={}, overrides=overrides), state_dir, FakeScanner())
    with running_appliance(app):
        yield app


def _request(peer: Peer, topic: str, payload: bytes, correlation: bytes, response: str) -> None:
    props = Properties(PacketTypes.PUBLISH)
    props.CorrelationData = correlation
    props.ResponseTopic = response
    peer.client.publish(topic, payload, qos=1, properties=props).wait_for_publish(5)


def test_reply_copy_is_delivered_under_the_production_acl(
    broker: RunningBroker, peers: list[Peer], tmp_path: Path
) -> None:
    base = f"{PREFIX}/scope-01"
    operator = connect(broker, peers, "operator", "pw-op", websockets=True)
    operator.subscribe(f"{base}/reply/operator/#")
    operator.subscribe(f"{base}/cmd/+/reply")
    operator.subscribe(f"{base}/availability")
    ingest = connect(broker, peers, "svc.ingest", None, cert="svc.ingest")
    ingest.subscribe(f"{base}/#")
    with tls_appliance(broker, tmp_path / "state", "scope-01"):
        assert wait_for(lambda: b"online" in operator.received(f"{base}/availability"), 15)
        inbox = f"{base}/reply/operator/req-1"
        _request(operator, f"{base}/cmd/status", b"{}", b"c-ok", inbox)
        assert wait_for(lambda: len(operator.received(inbox)) == 1, 10), broker.log_text()[-800:]
        # a response topic pointing at the device's own result topic gets no copy
        _request(operator, f"{base}/cmd/status", b"{}", b"c-evil", f"{base}/result")
        assert wait_for(lambda: len(operator.received(f"{base}/cmd/status/reply")) == 2, 10)
        time.sleep(0.3)
    reply = json.loads(operator.received(inbox)[0])
    validate("reply", reply)
    assert reply["correlation_id"] == "c-ok" and reply["ok"] is True
    assert ingest.received(f"{base}/result") == []


# -- bounded command parsing ---------------------------------------------------------------------


@contextlib.contextmanager
def plain_appliance(mosquitto: Mosquitto, tmp_path: Path) -> Iterator[Appliance]:
    app = Appliance(
        load_config(environ={}, overrides=app_config(mosquitto.url)),
        tmp_path / "state",
        FakeScanner(),
    )
    with running_appliance(app):
        yield app


@pytest.mark.parametrize(
    ("payload", "code"),
    [
        (b"[" * 10_000, "too_deep"),
        (b'{"a":' * 2_000 + b"1" + b"}" * 2_000, "too_deep"),
        (b'{"correlation_id": NaN}', "malformed"),
        (b'{"slide_id": "A1\\n"}', "invalid"),
    ],
    ids=["brackets", "objects", "nan", "newline-id"],
)
def test_hostile_commands_get_a_documented_error_reply(
    mosquitto: Mosquitto, tmp_path: Path, payload: bytes, code: str
) -> None:
    port = mosquitto.port
    verb = "scan" if code == "invalid" else "status"
    with (
        Collector(port, "omis/v1/#") as col,
        plain_appliance(mosquitto, tmp_path) as app,
    ):
        assert wait_until(lambda: b"online" in col.on("/availability"), 10)
        publish(port, f"omis/v1/dev1/cmd/{verb}", payload, b"c-1")
        assert wait_until(lambda: len(col.json_on(f"/cmd/{verb}/reply")) == 1, 10)
        (reply,) = col.json_on(f"/cmd/{verb}/reply")
        assert app.queue.depth == 0
    validate("reply", reply)
    assert reply["ok"] is False and reply["error"]["code"] == code
    assert reply["correlation_id"] == "c-1"
    assert col.results() == []
