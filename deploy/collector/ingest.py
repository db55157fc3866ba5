"""The MQTT side of the archive: a persistent MQTT 5 session, results from a shared subscription.

* ``clean_start=False`` with a session expiry: while this instance is away the broker keeps its
  session and queues what was routed to it; a restart under the same client id gets it all.
* Results come from ``$share/<group>/<prefix>/+/result``: the instances of a group split them.
* Retained live state (availability, status, ota/state) comes from plain subscriptions, because
  the broker never sends retained messages to a shared subscription; every instance stores it
  (the writes are idempotent).
* Acknowledgement is manual: the PUBACK goes out only after the row is committed.  If the
  database fails, nothing more is acknowledged; the instance drops the connection and
  reconnects after a back-off, and the broker redelivers everything unacknowledged.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from deploy.broker import parse_broker_url
from deploy.collector.config import CollectorMqtt
from deploy.collector.outcome import check_result
from deploy.collector.shadow import ShadowArchive
from deploy.collector.store import ArchiveStore
from deploy.exceptions import ArchiveError, MqttError, SchemaError
from deploy.messages.identifiers import is_identifier
from deploy.mqtt import configure_tls
from deploy.schemas import validate

log = logging.getLogger(__name__)

RECEIVE_MAXIMUM = 50  # unacknowledged results the broker may hand this instance at once
STATE_KINDS = ("availability", "status", "ota/state")
SHARED_KINDS = ("result", "shadow")  # one copy per group: results and shadow results


def _json(payload: bytes, schema: str) -> dict[str, Any] | None:
    """A decoded JSON object naming ``schema``; None for an empty (cleared retained) message.

    Only the envelope is checked: devices of several app versions share a fleet, and the
    archive keeps what each of them sends (results: :func:`check_result`).
    """
    if not payload:
        return None
    try:
        data = json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise SchemaError(f"{schema}: not UTF-8 JSON: {exc}") from exc
    if not isinstance(data, dict) or data.get("schema") != schema:
        raise SchemaError(f"not a JSON object with schema {schema!r}")
    return data


class ArchiveSubscriber:
    """One collector instance's MQTT session, feeding an :class:`ArchiveStore`."""

    def __init__(self, config: CollectorMqtt, store: ArchiveStore) -> None:
        self.config = config
        self.store = store
        self.address = parse_broker_url(config.broker)
        if self.address.scheme == "embedded":
            raise MqttError("mqtt.broker: the collector needs mqtt:// or mqtts://, not embedded")
        self.prefix = config.prefix
        self.connected = threading.Event()
        self.subscribed = threading.Event()  # the broker confirmed the subscriptions
        self.trouble = threading.Event()  # the database failed: reconnect for redelivery
        self.stored = 0
        self.duplicates = 0
        self.malformed = 0
        self._client: paho.Client | None = None
        self._handlers: dict[str, Callable[[str, bytes], None]] = {
            "result": self._on_result,
            "availability": self._on_availability,
            "status": self._on_status,
            "ota/state": self._on_ota_state,
            "shadow": self._on_shadow,
        }
        self.shadow = ShadowArchive(store.engine)  # omis.shadow/1: own table, own module

    @property
    def filters(self) -> list[str]:
        """The subscriptions: results shared by the group, live state per instance."""
        shared = [f"$share/{self.config.group}/{self.prefix}/+/{kind}" for kind in SHARED_KINDS]
        return shared + [f"{self.prefix}/+/{kind}" for kind in STATE_KINDS]

    def _build(self) -> paho.Client:
        cfg = self.config
        client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=cfg.client_id,
            protocol=MQTTProtocolVersion.MQTTv5,
            manual_ack=True,
        )
        client.enable_logger(logging.getLogger("deploy.collector.paho"))
        if cfg.username is not None:
            password = cfg.password.get_secret_value() if cfg.password else None
            client.username_pw_set(cfg.username, password)
        if self.address.tls:
            configure_tls(client, cfg.tls)
        client.reconnect_delay_set(
            max(1, round(cfg.reconnect_min_s)), max(1, round(cfg.reconnect_max_s))
        )
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_subscribe = lambda *_: self.subscribed.set()
        return client

    def start(self) -> None:
        """Connect in the background (reconnects by itself until :meth:`close`)."""
        if self._client is not None:
            return
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = self.config.session_expiry_s
        props.ReceiveMaximum = RECEIVE_MAXIMUM
        client = self._build()
        try:
            client.connect_async(
                self.address.host,
                self.address.port or 1883,
                keepalive=self.config.keepalive_s,
                clean_start=False,
                properties=props,
            )
        except (OSError, ValueError) as exc:
            raise MqttError(f"cannot connect to {self.address}: {exc}") from exc
        self._client = client
        client.loop_start()

    def run(self, stop: threading.Event) -> None:
        """Serve until ``stop``; after a database failure, reconnect with a back-off."""
        self.start()
        delay = self.config.reconnect_min_s
        while not stop.is_set():
            if not self.trouble.wait(0.2):
                continue
            client = self._client
            if client is None:
                return
            log.warning("database trouble: reconnecting in %.0f s for redelivery", delay)
            client.disconnect()
            client.loop_stop()
            if stop.wait(delay):
                return
            delay = min(delay * 2, self.config.reconnect_max_s)
            self.trouble.clear()
            client.reconnect()
            client.loop_start()

    def close(self) -> None:
        """Disconnect (the session stays on the broker until it expires); idempotent."""
        client, self._client = self._client, None
        if client is not None:
            client.disconnect()
            client.loop_stop()
        self.connected.clear()

    def _on_connect(
        self, client: paho.Client, _u: Any, flags: Any, reason: ReasonCode, _p: Any
    ) -> None:
        if reason.is_failure:
            log.error("broker refused the connection: %s", reason)
            return
        log.info(
            "connected to %s as %s (session present: %s)",
            self.address,
            self.config.client_id,
            flags.session_present,
        )
        client.subscribe([(f, 1) for f in self.filters])
        self.connected.set()

    def _on_disconnect(self, _c: paho.Client, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        self.connected.clear()
        self.subscribed.clear()
        log.info("disconnected from %s: %s", self.address, reason)

    def _on_message(self, client: paho.Client, _u: Any, msg: paho.MQTTMessage) -> None:
        if self.trouble.is_set():
            return  # not acknowledged: redelivered after the reconnect
        topic = msg.topic
        rest = topic[len(self.prefix) + 1 :] if topic.startswith(self.prefix + "/") else ""
        device, _, kind = rest.partition("/")
        handler = self._handlers.get(kind)
        if handler is None or not is_identifier(device):
            client.ack(msg.mid, msg.qos)
            return
        try:
            handler(device, bytes(msg.payload))
        except ArchiveError as exc:
            log.error("%s", exc)
            self.trouble.set()
            return
        except (SchemaError, ValueError, KeyError, TypeError) as exc:
            self.malformed += 1  # a poison message: acknowledged so it is not redelivered forever
            log.warning("ignoring malformed message on %s: %s", topic, exc)
        client.ack(msg.mid, msg.qos)

    def _on_result(self, device: str, payload: bytes) -> None:
        result = _json(payload, "omis.result/1")
        if result is None:
            return
        result = check_result(result)  # upgraded to the current format and validated
        if result["device_id"] != device:
            raise ValueError(f"result names device {result['device_id']!r}, topic {device!r}")
        if self.store.add_result(result):
            self.stored += 1
        else:
            self.duplicates += 1

    def _on_shadow(self, device: str, payload: bytes) -> None:
        if payload and not self.shadow.add(device, payload):
            self.duplicates += 1

    def _on_availability(self, device: str, payload: bytes) -> None:
        value = payload.decode("utf-8", "replace").strip()
        if value:
            validate("availability", value)
        self.store.set_availability(device, value)

    def _on_status(self, device: str, payload: bytes) -> None:
        self.store.set_status(device, _json(payload, "omis.status/1"))

    def _on_ota_state(self, device: str, payload: bytes) -> None:
        self.store.set_ota_state(device, _json(payload, "omis.ota_state/1"))
