"""Test support for the appliance: a real mosquitto on a free port, a fake scanner, subscribers.

Import the fixture into a test module with
``from broker_support import mosquitto_fixture  # noqa: F401`` (it is named ``mosquitto``)
(``tests/`` is on ``sys.path`` under pytest's default import mode, as for ``fakes``).

* :class:`Mosquitto` -- a broker process with a generated config in a tmp dir, which tests can
  stop, restart on the same port, pause (SIGSTOP: no PUBACKs) and resume; its log is kept.
* :class:`FakeScanner` -- an in-memory :class:`~deploy.appliance.base.SlideScanner` for logic
  tests: deterministic bodies, a per-field delay, honours the cancel flag.
* :class:`Collector` -- a paho subscriber that records every message on a filter.
* :func:`appliance_child` -- the appliance with the fake scanner in a *separate process*, for
  SIGKILL tests (the script is :data:`CHILD_SCRIPT`).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from deploy.appliance.base import ScannerInfo, ScanRequest, SlideListener
from deploy.appliance.service import Appliance
from deploy.broker import free_port, same_user_setting
from deploy.exceptions import ScanCancelledError
from deploy.messages.testing import classified_report
from inference.result import Simulation, SlideReport

MOSQUITTO = "/usr/sbin/mosquitto"
TESTS_DIR = Path(__file__).resolve().parent
SHA = "ab" * 32


def wait_appliance_ready(port: int, app: Appliance, prefix: str = "omis/v1") -> None:
    """Until this boot's status is out.  The link publishes it after subscribing to the command
    topics, so a command or an OTA offer sent from now on is heard (an offer's sender gives a
    silent device only a few seconds before it says the device is not there)."""
    boot, base = app.identity.boot_id, f"{prefix}/{app.identity.device_id}"
    with Collector(port, f"{base}/status", client_id=f"ready-{boot}") as seen:
        assert wait_until(
            lambda: any(s.get("boot_id") == boot for s in seen.json_on("/status")), 60
        ), f"{base}: the appliance never published the status of boot {boot}"


@contextlib.contextmanager
def running_appliance(app: Appliance) -> Iterator[Appliance]:
    """Start an in-process appliance with its supervision loop on a thread; stop it after."""
    app.start()
    loop = threading.Thread(target=app.run, daemon=True)
    loop.start()
    try:
        yield app
    finally:
        app.request_stop()
        loop.join(10)
        app.shutdown()


def port_open(port: int) -> bool:
    """True if something accepts connections on 127.0.0.1:port."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.3):
            return True
    except OSError:
        return False


def wait_until(predicate: Any, timeout: float, interval: float = 0.05) -> bool:
    """Poll ``predicate`` until true or ``timeout``; returns its last value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())


class Mosquitto:
    """A mosquitto child process on a fixed free port; restartable on that same port."""

    def __init__(
        self,
        workdir: Path,
        port: int | None = None,
        persistent: bool = False,
        extra_config: str = "",
    ) -> None:
        self.workdir = workdir
        self.persistent = persistent
        self.extra_config = extra_config  # more mosquitto.conf lines (e.g. the shipped limits)
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.config = workdir / "mosquitto.conf"
        self.log = workdir / "mosquitto.log"

    @property
    def url(self) -> str:
        """mqtt://127.0.0.1:PORT."""
        return f"mqtt://127.0.0.1:{self.port}"

    def start(self) -> Mosquitto:
        """Start (or restart) the broker and wait until it accepts connections."""
        persistence = (
            f"persistence true\npersistence_location {self.workdir}/\n"
            if self.persistent
            else "persistence false\n"
        )
        self.config.write_text(
            f"listener {self.port} 127.0.0.1\n{same_user_setting()}allow_anonymous true\n"
            f"{persistence}"
            f"log_dest file {self.log}\nlog_type all\n{self.extra_config}",
            "utf-8",
        )
        for _ in range(50):  # the port may linger for a moment after a stop
            self.proc = subprocess.Popen(
                [MOSQUITTO, "-c", str(self.config)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            up = wait_until(lambda: port_open(self.port) or self.proc.poll() is not None, 5)
            if up and self.proc.poll() is None:
                return self
            time.sleep(0.1)
        raise RuntimeError(f"mosquitto did not start on {self.port}: {self.log_text()[-500:]}")

    def kill(self) -> None:
        """SIGKILL the broker: nothing is saved (idempotent)."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()

    def stop(self) -> None:
        """Stop the broker (idempotent)."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGCONT)
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def pause(self) -> None:
        """SIGSTOP: the broker keeps its sockets but answers nothing (no PUBACK)."""
        if self.proc is not None:
            self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT after :meth:`pause`."""
        if self.proc is not None:
            self.proc.send_signal(signal.SIGCONT)

    def log_text(self) -> str:
        """Everything the broker logged."""
        try:
            return self.log.read_text("utf-8", "replace")
        except OSError:
            return ""


@pytest.fixture(name="mosquitto")
def mosquitto_fixture(tmp_path: Path) -> Iterator[Mosquitto]:
    """A fresh mosquitto on a free port, stopped after the test."""
    workdir = tmp_path / "broker"
    workdir.mkdir()
    broker = Mosquitto(workdir).start()
    try:
        yield broker
    finally:
        broker.stop()


class Collector:
    """A paho MQTT 5 subscriber recording (topic, payload, properties) on a filter."""

    def __init__(
        self, port: int, topic_filter: str, client_id: str = "collector", durable: bool = False
    ) -> None:
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        self.messages: list[tuple[str, bytes, Any]] = []
        self.lock = threading.Lock()
        self.subscribed = threading.Event()
        self.client = paho.Client(
            CallbackAPIVersion.VERSION2, client_id=client_id, protocol=MQTTProtocolVersion.MQTTv5
        )
        props = None
        if durable:  # a dashboard with a persistent session: the broker queues while it is away
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = 600
        self.client.on_connect = lambda c, *_: c.subscribe(topic_filter, qos=1)
        self.client.on_subscribe = lambda *_: self.subscribed.set()
        self.client.on_message = self._on_message
        self.client.reconnect_delay_set(1, 1)
        self.client.connect_async(
            "127.0.0.1", port, keepalive=10, clean_start=not durable, properties=props
        )

    def _on_message(self, client: Any, userdata: Any, msg: paho.MQTTMessage) -> None:
        with self.lock:
            self.messages.append((msg.topic, bytes(msg.payload), msg.properties))

    def __enter__(self) -> Collector:
        self.client.loop_start()
        if not self.subscribed.wait(10):
            raise RuntimeError("collector did not subscribe")
        return self

    def __exit__(self, *exc: object) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def on(self, suffix: str) -> list[bytes]:
        """Payloads of messages whose topic ends with ``suffix``."""
        with self.lock:
            return [p for t, p, _ in self.messages if t.endswith(suffix)]

    def json_on(self, suffix: str) -> list[dict[str, Any]]:
        """Decoded JSON payloads on topics ending with ``suffix``."""
        return [json.loads(p) for p in self.on(suffix)]

    def results(self) -> list[dict[str, Any]]:
        """Every result received (duplicates included)."""
        return self.json_on("/result")

    def unique_results(self) -> dict[str, dict[str, Any]]:
        """Results de-duplicated by ``message_id``, as a consumer does."""
        return {r["message_id"]: r for r in self.results()}


def publish(
    port: int,
    topic: str,
    payload: bytes | str,
    correlation: bytes | None = None,
    response_topic: str | None = None,
    *,
    retain: bool = False,
) -> None:
    """Publish one QoS 1 message from a short-lived MQTT 5 client and wait for its PUBACK
    (``retain``: the broker keeps it for later subscribers; an empty payload clears it)."""
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    client = paho.Client(CallbackAPIVersion.VERSION2, protocol=MQTTProtocolVersion.MQTTv5)
    client.connect("127.0.0.1", port)
    client.loop_start()
    props = None
    if correlation is not None or response_topic is not None:
        props = Properties(PacketTypes.PUBLISH)
    if correlation is not None:
        props.CorrelationData = correlation
    if response_topic is not None:
        props.ResponseTopic = response_topic
    client.publish(topic, payload, qos=1, retain=retain, properties=props).wait_for_publish(5)
    client.disconnect()
    client.loop_stop()


class FakeScanner:
    """In-memory scanner: deterministic result bodies, ``delay_s`` per field, honours cancel."""

    def __init__(self, delay_s: float = 0.0, fail_slides: frozenset[str] = frozenset()) -> None:
        self.delay_s = delay_s
        self.fail_slides = fail_slides
        self.scanned: list[str] = []
        self.opened = False
        self.closed = False
        self.listener: SlideListener | None = None

    def open(self) -> ScannerInfo:
        self.opened = True
        return ScannerInfo(
            model={"name": "fake", "version": 3, "sha256": SHA},
            engine={"name": "fake", "precision": "fp32"},
            firmware={"name": "fake-fw", "version": "1.0"},
        )

    def set_slide_listener(self, listener: SlideListener | None) -> None:
        self.listener = listener

    def insert_slide(self, slide_id: str) -> None:
        """What the firmware's "slide inserted" event does."""
        if self.listener is not None:
            self.listener(slide_id)

    def scan(self, request: ScanRequest, cancel: threading.Event) -> SlideReport:
        from deploy.exceptions import ScanError

        fields = []
        for index in range(request.fields):
            if cancel.wait(self.delay_s) if self.delay_s else cancel.is_set():
                raise ScanCancelledError(f"scan {request.scan_id} cancelled at field {index}")
            fields.append({"index": index, "valid_fraction": 0.9, "quality": "ok"})
        if request.slide_id in self.fail_slides:
            raise ScanError(f"slide {request.slide_id}: focus lost")
        p_high = (zlib.crc32(request.slide_id.encode()) % 1000) / 1000.0
        self.scanned.append(request.slide_id)
        report = classified_report(
            p_high,
            model={"name": "fake", "version": 3, "sha256": SHA},
            backend={"name": "fake", "precision": "fp32"},
            fields=fields,
            axis=(400.0, 500.0),
            values=(0.1, 0.2),
            timings_ms={"total": 1.0},
        )
        return report.with_context(None, Simulation(pap_group="II"))

    def close(self) -> None:
        self.closed = True


CHILD_SCRIPT = """
import json, signal, sys
sys.path.insert(0, {tests!r})
from pathlib import Path
from broker_support import FakeScanner
from deploy.appliance.base import ScanRequest
from deploy.appliance.service import Appliance
from deploy.config import load_config

cfg = load_config(overrides=json.loads(sys.argv[1]))
app = Appliance(cfg, Path(sys.argv[2]), FakeScanner(delay_s=float(sys.argv[3])))
signal.signal(signal.SIGTERM, lambda *a: app.request_stop())
try:
    app.start()
    for slide in sys.argv[4:]:
        app.submit(ScanRequest(slide, 2))
    print("READY", flush=True)
    app.run()
finally:
    app.shutdown()
"""


def appliance_child(
    config: dict[str, Any], state_dir: Path, slides: list[str], delay_s: float = 0.0
) -> subprocess.Popen[str]:
    """The appliance with a :class:`FakeScanner` in its own process (stdout says READY)."""
    script = CHILD_SCRIPT.format(tests=str(TESTS_DIR))
    return subprocess.Popen(
        [sys.executable, "-c", script, json.dumps(config), str(state_dir), str(delay_s), *slides],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=dict(os.environ, PYTHONUNBUFFERED="1"),
    )


def app_config(broker_url: str, device: str = "dev1", **sections: dict[str, Any]) -> dict[str, Any]:
    """Config overrides for a fast test appliance on ``broker_url``."""
    config: dict[str, Any] = {
        "device": {"id": device},
        "mqtt": {
            "broker": broker_url,
            "reconnect_min_s": 1,
            "reconnect_max_s": 1,
            "keepalive_s": 5,
        },
        "scan": {"fields": 2, "queue_size": 50, "shutdown_grace_s": 5},
        "service": {"health_interval_s": 0.5},
    }
    for name, values in sections.items():
        config.setdefault(name, {}).update(values)
    return config
