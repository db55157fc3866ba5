"""The production broker configuration (deploy/mosquitto/) against a real mosquitto.

One broker for the module, started from the rendered production mosquitto.conf with a CA,
server and client certificates made at test time and password files made with
``mosquitto_passwd -b``.  Real paho MQTT 5 clients prove: no anonymous access, the client
certificate as the identity on the device listener, a device publishes only under its own
topics (PUBACK
reason 135 elsewhere, nothing delivered) and reads only its own commands, a dashboard user
reads everything and writes nothing, an operator may command.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from deploy_support import (
    DASHBOARD_PORT,
    DEVICE_PORT,
    ROOT,
    Peer,
    RunningBroker,
    dev_broker_module,
    wait_for,
)

from deploy.broker import free_port

NOT_AUTHORIZED = 135
BAD_CREDENTIALS = 134
PW = {
    "scope-01": "pw-scope-01",
    "scope-02": "pw-scope-02",
    "dashboard": "pw-dash",
    "operator": "pw-op",
}
PREFIX = "omis/v1"
CONF = ROOT / "deploy" / "mosquitto" / "mosquitto.conf"


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningBroker]:
    dev = dev_broker_module()
    tree = dev.build_dev_broker(
        tmp_path_factory.mktemp("broker") / "tree",
        devices={"scope-01": PW["scope-01"], "scope-02": PW["scope-02"]},
        users={"dashboard": PW["dashboard"], "operator": PW["operator"]},
        services={"svc.ingest": "pw-ingest"},
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


def device(broker: RunningBroker, peers: list[Peer], name: str) -> Peer:
    peer = Peer(broker, name, PW[name], cert=name).connect()
    peers.append(peer)
    assert peer.connected.is_set(), f"{name}: CONNACK {peer.connack}\n{broker.log_text()[-800:]}"
    return peer


def user(broker: RunningBroker, peers: list[Peer], name: str) -> Peer:
    peer = Peer(broker, name, PW[name], websockets=True).connect()
    peers.append(peer)
    assert peer.connected.is_set(), f"{name}: CONNACK {peer.connack}\n{broker.log_text()[-800:]}"
    return peer


# ------------------------------------------------------------------- the file itself ----


def _listeners(text: str) -> list[dict[str, str]]:
    """Per-listener settings of a mosquitto.conf (per_listener_settings true)."""
    blocks: list[dict[str, str]] = []
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        key, _, value = line.partition(" ")
        if key == "listener":
            blocks.append({"port": value.split()[0]})
        elif blocks:
            blocks[-1][key] = value.strip()
    return blocks


def test_production_config_is_hardened() -> None:
    text = CONF.read_text("utf-8")
    assert re.search(r"^per_listener_settings true$", text, re.M)
    listeners = {b["port"]: b for b in _listeners(text)}
    assert set(listeners) == {"8883", "8884"}, "only the TLS device and TLS dashboard listeners"
    for port, block in listeners.items():
        assert block.get("allow_anonymous") == "false", port
        assert block.get("certfile") and block.get("keyfile"), f"{port} must use TLS"
        assert block.get("acl_file"), port
    assert listeners["8883"]["require_certificate"] == "true"
    # issue 14: the device identity is the certificate's CN, never a password
    assert listeners["8883"]["use_identity_as_username"] == "true"
    assert "password_file" not in listeners["8883"]
    assert listeners["8884"].get("password_file")
    assert listeners["8884"]["protocol"] == "websockets"
    assert "allow_anonymous true" not in text


def test_dev_renderer_maps_every_listener(tmp_path: Path) -> None:
    dev = dev_broker_module()
    with pytest.raises(dev.DevBrokerError, match="8884"):
        dev.render_config(CONF.read_text("utf-8"), tmp_path, {DEVICE_PORT: 1}, "127.0.0.1")
    rendered = dev.render_config(
        CONF.read_text("utf-8"), tmp_path, {DEVICE_PORT: 1, DASHBOARD_PORT: 2}, "127.0.0.1"
    )
    assert "/etc/mosquitto" not in rendered and "/var/lib/mosquitto" not in rendered
    assert [b["port"] for b in _listeners(rendered)] == ["1", "2"]


def test_private_keys_are_not_world_readable(broker: RunningBroker) -> None:
    tree = broker.tree
    keys = [tree.server_key, tree.root / "ca.key", *(c.key for c in tree.clients.values())]
    for key in keys:
        assert key.stat().st_mode & 0o077 == 0, key


# ----------------------------------------------------------------------- authentication ----


@pytest.mark.parametrize("websockets", [False, True], ids=["device-listener", "dashboard-ws"])
def test_anonymous_connections_are_refused(broker: RunningBroker, websockets: bool) -> None:
    # On the device listener "anonymous" means without a certificate (its CN is the identity).
    peer = Peer(broker, None, None, websockets=websockets, cert=None)
    try:
        peer.connect(timeout=3)
        assert not peer.connected.is_set()
        if websockets:
            assert peer.connack in (NOT_AUTHORIZED, BAD_CREDENTIALS)
        else:
            assert peer.connack is None, "the TLS handshake must fail before any CONNACK"
    finally:
        peer.close()


def test_wrong_password_is_refused(broker: RunningBroker) -> None:
    peer = Peer(broker, "dashboard", "not-the-password", websockets=True)
    try:
        peer.connect()
        assert not peer.connected.is_set()
        assert peer.connack in (NOT_AUTHORIZED, BAD_CREDENTIALS)
    finally:
        peer.close()


def test_device_password_does_not_change_the_identity(
    broker: RunningBroker, peers: list[Peer]
) -> None:
    # Issue 14: scope-01's certificate acts as scope-01 whatever it shows as a password, and
    # another device's credentials do not make it that device (tests/test_hostile_broker.py).
    peer = Peer(broker, "scope-02", PW["scope-02"], cert="scope-01").connect()
    peers.append(peer)
    assert peer.connected.is_set()
    assert peer.publish_ok(f"{PREFIX}/scope-01/status", b"{}")
    assert not peer.publish_ok(f"{PREFIX}/scope-02/status", b"{}")


def test_device_listener_requires_a_client_certificate(broker: RunningBroker) -> None:
    peer = Peer(broker, "scope-01", PW["scope-01"], cert=None)
    try:
        peer.connect(timeout=3)
        assert not peer.connected.is_set()
        assert peer.connack is None, "the TLS handshake must fail before any CONNACK"
    finally:
        peer.close()


def test_dashboard_account_cannot_use_the_device_listener(
    broker: RunningBroker, peers: list[Peer]
) -> None:
    # Users live in users.passwd on 8884; on 8883 the certificate is the identity, so the
    # dashboard's name and password give no dashboard rights there: this is scope-01.
    peer = Peer(broker, "dashboard", PW["dashboard"], cert="scope-01").connect()
    peers.append(peer)
    other = device(broker, peers, "scope-02")
    peer.subscribe(f"{PREFIX}/scope-02/status")
    assert other.publish_ok(f"{PREFIX}/scope-02/status", b"{}")
    time.sleep(0.3)
    assert peer.received(f"{PREFIX}/scope-02/status") == []


# ------------------------------------------------------------------------ authorisation ----


def test_device_publishes_under_its_own_topics_only(
    broker: RunningBroker, peers: list[Peer]
) -> None:
    watcher = user(broker, peers, "operator")
    assert watcher.subscribe(f"{PREFIX}/#") == [1]
    scope1 = device(broker, peers, "scope-01")
    own = {
        "availability": b"online",
        "status": b'{"schema": "omis.status/1"}',
        "result": b'{"schema": "omis.result/1"}',
        "metrics": b"{}",
        "ota/state": b'{"schema": "omis.ota_state/1"}',
        "cmd/scan/reply": b"{}",
    }
    for leaf, payload in own.items():
        assert scope1.publish(f"{PREFIX}/scope-01/{leaf}", payload) == 0, leaf
    for leaf in ("result", "status", "availability", "cmd/scan"):
        assert scope1.publish(f"{PREFIX}/scope-02/{leaf}", b"forged") == NOT_AUTHORIZED, leaf
    assert scope1.publish("elsewhere/topic", b"x") == NOT_AUTHORIZED
    for leaf in ("result", "metrics", "cmd/scan/reply"):
        topic = f"{PREFIX}/scope-01/{leaf}"
        assert wait_for(lambda t=topic: watcher.received(t), 5), topic
    time.sleep(0.3)  # a denied publish would have arrived by now
    forged = [t for t, p in watcher.messages if p == b"forged" or t.startswith("elsewhere")]
    assert forged == []
    assert watcher.received(f"{PREFIX}/scope-01/status") == [own["status"]]


def test_device_reads_only_its_own_commands(broker: RunningBroker, peers: list[Peer]) -> None:
    scope1 = device(broker, peers, "scope-01")
    scope1.subscribe(f"{PREFIX}/+/cmd/+")
    operator = user(broker, peers, "operator")
    assert operator.publish(f"{PREFIX}/scope-02/cmd/scan", b'{"for": "scope-02"}') == 0
    assert operator.publish(f"{PREFIX}/scope-01/cmd/scan", b'{"for": "scope-01"}') == 0
    assert wait_for(lambda: scope1.received(f"{PREFIX}/scope-01/cmd/scan"), 5)
    time.sleep(0.3)
    assert scope1.received(f"{PREFIX}/scope-02/cmd/scan") == []


def test_dashboard_reads_everything_and_writes_nothing(
    broker: RunningBroker, peers: list[Peer]
) -> None:
    dashboard = user(broker, peers, "dashboard")
    dashboard.subscribe(f"{PREFIX}/+/result")
    dashboard.subscribe(f"{PREFIX}/+/availability")
    scope1 = device(broker, peers, "scope-01")
    scope1.subscribe(f"{PREFIX}/scope-01/cmd/+")
    scope2 = device(broker, peers, "scope-02")
    assert scope2.publish(f"{PREFIX}/scope-02/availability", b"online", retain=True) == 0
    assert scope1.publish(f"{PREFIX}/scope-01/result", b'{"n": 1}') == 0
    assert wait_for(lambda: dashboard.received(f"{PREFIX}/scope-01/result"), 5)
    assert wait_for(lambda: dashboard.received(f"{PREFIX}/scope-02/availability"), 5)
    for topic in (
        f"{PREFIX}/scope-01/cmd/scan",
        f"{PREFIX}/scope-01/result",
        f"{PREFIX}/dashboard/result",
        f"{PREFIX}/scope-01/availability",
    ):
        assert dashboard.publish(topic, b"from-dashboard") == NOT_AUTHORIZED, topic
    time.sleep(0.3)
    assert scope1.received(f"{PREFIX}/scope-01/cmd/scan") == []
    assert b"from-dashboard" not in dashboard.received(f"{PREFIX}/scope-01/result")
    assert scope2.publish(f"{PREFIX}/scope-02/availability", b"", retain=True) == 0  # clean up


def test_operator_may_command_a_device(broker: RunningBroker, peers: list[Peer]) -> None:
    scope2 = device(broker, peers, "scope-02")
    scope2.subscribe(f"{PREFIX}/scope-02/cmd/+")
    operator = user(broker, peers, "operator")
    assert operator.publish(f"{PREFIX}/scope-02/cmd/scan", b'{"slide_id": "S-1"}') == 0
    assert operator.publish(f"{PREFIX}/scope-02/result", b"forged") == NOT_AUTHORIZED
    assert wait_for(lambda: scope2.received(f"{PREFIX}/scope-02/cmd/scan"), 5)


def test_ingest_service_reads_results_and_sends_only_scan_and_cancel(
    broker: RunningBroker, peers: list[Peer]
) -> None:
    """The archive sends the API's scan/cancel (audited there) and reads their replies; it
    never offers an update or asks for a status."""
    ingest = Peer(broker, "svc.ingest", "pw-ingest", cert="svc.ingest").connect()
    peers.append(ingest)
    assert ingest.connected.is_set()
    ingest.subscribe(f"{PREFIX}/+/result")
    for verb in ("scan", "cancel"):
        assert ingest.subscribe(f"{PREFIX}/+/cmd/{verb}/reply") == [1], verb
    scope1 = device(broker, peers, "scope-01")
    scope1.subscribe(f"{PREFIX}/scope-01/cmd/+")
    assert scope1.publish(f"{PREFIX}/scope-01/result", b'{"n": 2}') == 0
    assert wait_for(lambda: ingest.received(f"{PREFIX}/scope-01/result"), 5)
    for verb in ("scan", "cancel"):
        assert ingest.publish(f"{PREFIX}/scope-01/cmd/{verb}", b"{}") == 0, verb
        assert wait_for(lambda v=verb: scope1.received(f"{PREFIX}/scope-01/cmd/{v}"), 5), verb
        assert scope1.publish(f"{PREFIX}/scope-01/cmd/{verb}/reply", b"{}") == 0
        topic = f"{PREFIX}/scope-01/cmd/{verb}/reply"
        assert wait_for(lambda t=topic: ingest.received(t), 5), verb
    for verb in ("ota", "status"):
        assert ingest.publish(f"{PREFIX}/scope-01/cmd/{verb}", b"{}") == NOT_AUTHORIZED, verb
    time.sleep(0.3)  # a denied publish would have arrived by now
    assert scope1.received(f"{PREFIX}/scope-01/cmd/ota") == []


def test_a_device_publishes_only_its_own_shadow_results(
    broker: RunningBroker, peers: list[Peer]
) -> None:
    ingest = Peer(broker, "svc.ingest", "pw-ingest", cert="svc.ingest").connect()
    peers.append(ingest)
    assert ingest.connected.is_set()
    assert ingest.subscribe(f"{PREFIX}/+/shadow") == [1]
    scope1 = device(broker, peers, "scope-01")
    assert scope1.publish(f"{PREFIX}/scope-01/shadow", b'{"schema": "omis.shadow/1"}') == 0
    assert scope1.publish(f"{PREFIX}/scope-02/shadow", b"forged") == NOT_AUTHORIZED
    assert wait_for(lambda: ingest.received(f"{PREFIX}/scope-01/shadow"), 5)
    time.sleep(0.3)  # a denied publish would have arrived by now
    assert ingest.received(f"{PREFIX}/scope-02/shadow") == []
    assert ingest.publish(f"{PREFIX}/scope-01/shadow", b"x") == NOT_AUTHORIZED
