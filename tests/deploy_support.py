"""Test support for the deployment tests: the production broker configuration, running.

* :func:`dev_broker_module` -- ``deploy/mosquitto/dev_broker.py`` (a script, not in the wheel).
* :class:`RunningBroker` -- mosquitto started with the rendered production configuration on
  free ports; its log is kept for failure messages.
* :class:`Peer` -- a paho MQTT 5 client (TCP+TLS or WebSockets+TLS) that records what it
  receives and the reason code of every PUBACK / SUBACK / CONNACK.
"""

from __future__ import annotations

import importlib.util
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import paho.mqtt.client as paho
from broker_support import port_open
from broker_support import wait_until as wait_for
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

ROOT = Path(__file__).resolve().parent.parent
MOSQUITTO = "/usr/sbin/mosquitto"
DEVICE_PORT = 8883
DASHBOARD_PORT = 8884


def dev_broker_module() -> ModuleType:
    """Import deploy/mosquitto/dev_broker.py by path."""
    path = ROOT / "deploy" / "mosquitto" / "dev_broker.py"
    spec = importlib.util.spec_from_file_location("omis_dev_broker", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


class RunningBroker:
    """mosquitto with a dev_broker tree (see ``deploy/mosquitto/dev_broker.py``)."""

    def __init__(self, tree: Any) -> None:
        self.tree = tree
        self.log = Path(tree.root) / "mosquitto.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> RunningBroker:
        """Start mosquitto and wait for both listeners."""
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                [MOSQUITTO, "-c", str(self.tree.config)], stdout=log, stderr=subprocess.STDOUT
            )
        ports = (self.tree.device_port, self.tree.dashboard_port)
        up = wait_for(lambda: all(map(port_open, ports)) or self.proc.poll() is not None, 10)
        if not up or self.proc.poll() is not None:
            self.stop()
            raise RuntimeError(f"mosquitto did not start: {self.log_text()[-1500:]}")
        return self

    def stop(self) -> None:
        """Stop mosquitto (idempotent)."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def log_text(self) -> str:
        """What the broker logged."""
        try:
            return self.log.read_text("utf-8", "replace")
        except OSError:
            return ""


class Peer:
    """One MQTT 5 client against the test broker; records messages and reason codes."""

    def __init__(
        self,
        broker: RunningBroker,
        username: str | None,
        password: str | None,
        *,
        websockets: bool = False,
        cert: str | None = None,
    ) -> None:
        tree = broker.tree
        self.port = tree.dashboard_port if websockets else tree.device_port
        self.client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"test-{username}-{time.monotonic_ns()}",
            protocol=MQTTProtocolVersion.MQTTv5,
            transport="websockets" if websockets else "tcp",
        )
        if websockets:
            self.client.ws_set_options(path="/mqtt")
        client_cert = tree.clients[cert] if cert else None
        self.client.tls_set(
            ca_certs=str(tree.ca_cert),
            certfile=str(client_cert.cert) if client_cert else None,
            keyfile=str(client_cert.key) if client_cert else None,
            cert_reqs=ssl.CERT_REQUIRED,
        )
        if username is not None:
            self.client.username_pw_set(username, password)
        self.lock = threading.Lock()
        self.messages: list[tuple[str, bytes]] = []
        self.acks: dict[int, int] = {}
        self.subacks: dict[int, list[int]] = {}
        self.connack: int | None = None
        self.connected = threading.Event()
        self.done = threading.Event()
        self.client.on_connect = self._on_connect
        self.client.on_connect_fail = self._on_connect_fail
        self.client.on_message = self._on_message
        self.client.on_publish = self._on_publish
        self.client.on_subscribe = self._on_subscribe

    # paho callbacks (callback API version 2)
    def _on_connect(self, _c: Any, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        self.connack = int(reason.value)
        if not reason.is_failure:
            self.connected.set()
        self.done.set()

    def _on_connect_fail(self, _c: Any, _u: Any) -> None:
        self.done.set()

    def _on_message(self, _c: Any, _u: Any, msg: Any) -> None:
        with self.lock:
            self.messages.append((msg.topic, bytes(msg.payload)))

    def _on_publish(self, _c: Any, _u: Any, mid: int, reason: Any, _p: Any) -> None:
        with self.lock:
            self.acks[mid] = int(reason.value)

    def _on_subscribe(self, _c: Any, _u: Any, mid: int, reasons: Any, _p: Any) -> None:
        with self.lock:
            self.subacks[mid] = [int(r.value) for r in reasons]

    def connect(self, timeout: float = 5.0) -> Peer:
        """Connect; ``connack`` holds the CONNACK reason (None: no CONNACK, e.g. TLS failed)."""
        try:
            self.client.connect("localhost", self.port, keepalive=30)
        except (OSError, ssl.SSLError):
            self.done.set()
            return self
        self.client.loop_start()
        self.done.wait(timeout)
        if not self.connected.is_set():
            self.client.loop_stop()
        return self

    def subscribe(self, topic_filter: str, timeout: float = 5.0) -> list[int]:
        """Subscribe with QoS 1; the SUBACK reason codes."""
        _rc, mid = self.client.subscribe(topic_filter, qos=1)
        assert mid is not None, f"subscribe to {topic_filter} was not sent"
        assert wait_for(lambda: mid in self.subacks, timeout), f"no SUBACK for {topic_filter}"
        return self.subacks[mid]

    def publish(self, topic: str, payload: bytes | str, retain: bool = False) -> int:
        """Publish with QoS 1 and return the PUBACK reason code (0 success, 135 denied)."""
        info = self.client.publish(topic, payload, qos=1, retain=retain)
        assert wait_for(lambda: info.mid in self.acks, 5.0), f"no PUBACK for {topic}"
        return self.acks[info.mid]

    def publish_ok(self, topic: str, payload: bytes | str, retain: bool = False) -> bool:
        """Publish with QoS 1; True for a success reason (0, or 16 "no matching subscribers")."""
        return self.publish(topic, payload, retain) < 128

    def received(self, topic: str) -> list[bytes]:
        """Payloads received on exactly ``topic``."""
        with self.lock:
            return [p for t, p in self.messages if t == topic]

    def close(self) -> None:
        """Disconnect and stop the network thread (idempotent)."""
        if self.connected.is_set():
            self.client.disconnect()
        self.client.loop_stop()
        self.connected.clear()
