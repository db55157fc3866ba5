"""One device's offer over MQTT: the path ``omis ota publish`` takes, with a device check first.

Before anything is sent, the device's retained ``ota/state`` must arrive within
``state_wait_s``: a device that never reported one is unknown or offline, and the rollout
halts on it at once instead of sending every chunk into the void.
"""

from __future__ import annotations

import json
import logging
import queue
import secrets
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from deploy.broker import BrokerAddress
from deploy.fleet.rollout import DeviceOutcome
from deploy.ota.delivery import inline_source, make_offer
from deploy.ota.exceptions import DeliveryError
from deploy.ota.sender import OfferSender, final_outcome

log = logging.getLogger(__name__)

#: ``ota/state`` outcome step → rollout step.
STEP_OF_OUTCOME = {"committed": "committed", "rolled_back": "rolled_back", "rejected": "rejected"}


def read_ota_state(
    address: BrokerAddress, prefix: str, device_id: str, wait_s: float
) -> dict[str, Any] | None:
    """The device's retained ``ota/state`` (None when none arrives within ``wait_s``)."""
    inbox: queue.Queue[bytes] = queue.Queue()
    client = paho.Client(CallbackAPIVersion.VERSION2, protocol=MQTTProtocolVersion.MQTTv5)
    if address.tls:
        client.tls_set(cert_reqs=ssl.CERT_REQUIRED)
    client.on_message = lambda _c, _u, msg: inbox.put(bytes(msg.payload))
    try:
        client.connect(address.host, address.port or 1883, keepalive=30)
    except (OSError, ValueError) as exc:
        raise DeliveryError(f"cannot connect to {address}: {exc}") from exc
    client.loop_start()
    try:
        client.subscribe(f"{prefix}/{device_id}/ota/state", qos=1)
        while True:
            try:
                payload = inbox.get(timeout=wait_s)
            except queue.Empty:
                return None
            if not payload:
                continue  # a cleared retained message
            try:
                data = json.loads(payload)
            except (UnicodeDecodeError, json.JSONDecodeError):
                continue
            if isinstance(data, dict):
                return data
    finally:
        client.disconnect()
        client.loop_stop()


def _version(state: dict[str, Any] | None) -> int | None:
    value = (state or {}).get("current")
    return value if isinstance(value, int) and not isinstance(value, bool) else None


@dataclass
class MqttOfferer:
    """Offers one signed bundle ``.tar`` to devices, one connection per offer."""

    address: BrokerAddress
    prefix: str
    archive: Path
    version: int
    state_wait_s: float = 5.0
    reply_wait_s: float = 120.0
    outcome_wait_s: float = 600.0
    chunk_size: int = 256 * 1024

    def current_version(self, device_id: str) -> int | None:
        """The version the device serves now, from its retained ``ota/state``."""
        return _version(read_ota_state(self.address, self.prefix, device_id, self.state_wait_s))

    def offer(self, device_id: str) -> DeviceOutcome:
        """Check the device answers, offer the bundle inline, wait for the final outcome."""
        state = read_ota_state(self.address, self.prefix, device_id, self.state_wait_s)
        if state is None:
            return DeviceOutcome(
                "timeout",
                None,
                f"no ota/state from {device_id} within {self.state_wait_s:.0f} s "
                "(unknown device or offline)",
            )
        current = _version(state)
        if current is not None and current == self.version:
            return DeviceOutcome("committed", current, "already serving this version")
        if current is not None and current > self.version:
            return DeviceOutcome("rejected", current, f"serves a newer version ({current})")
        cid = secrets.token_hex(8)
        source = inline_source(self.archive, secrets.token_hex(8), self.chunk_size)
        offer = make_offer(self.archive, source, cid)
        try:
            with OfferSender(self.address, self.prefix, device_id) as sender:
                sender.connect()
                reply = sender.deliver(offer, self.archive, self.reply_wait_s)
                if not reply.get("ok", False):
                    return DeviceOutcome("rejected", current, _reply_reason(reply))
                final = final_outcome(sender.outcome(offer, self.outcome_wait_s), cid)
        except DeliveryError as exc:
            return DeviceOutcome("timeout", current, str(exc))
        step = STEP_OF_OUTCOME.get(str(final.get("outcome")), "rejected")
        version = final.get("version")
        return DeviceOutcome(
            step,
            version if isinstance(version, int) else current,
            str(final.get("reason") or ""),
        )


def _reply_reason(reply: dict[str, Any]) -> str:
    error = reply.get("error")
    return str(error.get("message", error)) if isinstance(error, dict) else str(error or reply)
