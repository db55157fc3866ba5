"""The appliance against the production broker configuration: TLS, client certificate,
password file and per-device ACLs (deploy/mosquitto), certificates made at test time.

``omis scan`` connects as device ``scope-01`` over mqtts with its certificate and password
(secrets from files, as systemd credentials provide them); an ingest service reads the result.
A device that claims another device's id is refused by the ACL: its results are never
acknowledged, so they stay in its outbox instead of being lost.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from deploy_support import (
    DASHBOARD_PORT,
    DEVICE_PORT,
    Peer,
    RunningBroker,
    dev_broker_module,
    wait_for,
)
from fakes.bundles import make_bundle

from deploy.broker import find_mosquitto, free_port

pytestmark = pytest.mark.skipif(find_mosquitto() is None, reason="mosquitto is not installed")
PW = {"scope-01": "pw-scope-01", "scope-02": "pw-scope-02"}


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningBroker]:
    tree = dev_broker_module().build_dev_broker(
        tmp_path_factory.mktemp("tls-broker") / "tree",
        devices=PW,
        users={"dashboard": "pw-dash"},
        services={"svc.ingest": "pw-ingest"},
        ports={DEVICE_PORT: free_port(), DASHBOARD_PORT: free_port()},
    )
    running = RunningBroker(tree).start()
    yield running
    running.stop()


def _scan(broker: RunningBroker, tmp_path: Path, cert: str, device_id: str) -> dict[str, object]:
    tree = broker.tree
    client = tree.clients[cert]
    secret = tmp_path / "mqtt-password"
    secret.write_text(PW[cert] + "\n")
    secret.chmod(0o600)
    env = {
        **os.environ,
        "OMIS_MQTT__USERNAME": cert,
        "OMIS_MQTT__PASSWORD_FILE": str(secret),
        "OMIS_MQTT__TLS__CA_FILE": str(tree.ca_cert),
        "OMIS_MQTT__TLS__CERT_FILE": str(client.cert),
        "OMIS_MQTT__TLS__KEY_FILE": str(client.key),
    }
    make_bundle(tmp_path / "bundle")
    argv = [
        sys.executable, "-m", "deploy.cli", "scan", "--microscope", "sim://?seed=3",
        "--broker", f"mqtts://localhost:{tree.device_port}", "--bundle",
        str(tmp_path / "bundle"), "--slides", "1", "--fields", "1", "--device-id", device_id,
        "--state-dir", str(tmp_path / "state"), "--json", "-q",
    ]  # fmt: skip
    done = subprocess.run(
        argv,
        capture_output=True,
        text=True,
        env=env,
        timeout=180,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report: dict[str, object] = json.loads(done.stdout)
    return report


def test_device_publishes_over_tls_with_certificate_and_password(
    broker: RunningBroker, tmp_path: Path
) -> None:
    ingest = Peer(broker, "svc.ingest", "pw-ingest", cert="svc.ingest").connect()
    try:
        assert ingest.connected.is_set(), broker.log_text()[-800:]
        ingest.subscribe("omis/v1/+/result")
        report = _scan(broker, tmp_path, "scope-01", "scope-01")
        assert report["summary"] == {"acknowledged": 1, "stored": 0, "failed": 0}
        assert wait_for(lambda: ingest.received("omis/v1/scope-01/result"), 10)
    finally:
        ingest.close()


def test_a_device_cannot_publish_as_another_device(broker: RunningBroker, tmp_path: Path) -> None:
    # scope-02's certificate and password, but scope-01's topics: the ACL refuses every
    # publish, so nothing is acknowledged and the result stays in the durable outbox.
    report = _scan(broker, tmp_path, "scope-02", "scope-01")
    summary = report["summary"]
    assert isinstance(summary, dict)
    assert summary["acknowledged"] == 0
    assert summary["stored"] + summary["failed"] == 1
