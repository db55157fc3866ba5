"""The embedded broker (mosquitto as a child process) keeps its log where it can be read.

Started as root, mosquitto would switch to the ``mosquitto`` user and silently lose its log in
the private directory this process made; the errors it reports would then read "no log output".
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from deploy.broker import EmbeddedBroker, mosquitto_config, same_user_setting


def test_config_keeps_the_user_only_when_root(tmp_path: Path) -> None:
    text = mosquitto_config(1883, tmp_path)
    if os.geteuid() == 0:
        assert same_user_setting() == "user root\n"
        assert "user root\n" in text
    else:
        assert same_user_setting() == ""
        assert "user " not in text


def test_embedded_broker_serves_and_writes_its_log() -> None:
    with EmbeddedBroker() as broker:
        address = broker.start()
        client = paho.Client(CallbackAPIVersion.VERSION2, client_id="probe")
        client.connect(address.host, address.port)
        client.disconnect()
        workdir = Path(broker._workdir.name)  # type: ignore[union-attr]
        log = workdir / "mosquitto.log"
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and "as probe" not in _read(log):
            time.sleep(0.05)
        assert "as probe" in _read(log), f"mosquitto wrote no log into {workdir}"


def _read(path: Path) -> str:
    try:
        return path.read_text("utf-8", "replace")
    except OSError:
        return ""
