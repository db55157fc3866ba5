"""One device's offer over MQTT: the path ``omis ota publish`` takes, with a device check first.

Before anything is sent, the device's retained ``ota/state`` must arrive within
``state_wait_s``: a device that never reported one is unknown or offline, and the rollout
halts on it at once instead of sending every chunk into the void.
"""

from __future__ import annotations

import logging
import queue
import secrets
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from deploy.broker import BrokerAddress
from deploy.fleet.rollout import DeviceOutcome
from deploy.messages.ota_state import OtaStateMessage
from deploy.messages.parsing import MessageError, parse_message
from deploy.ota.delivery import OfferMode, OtaOffer, inline_source, make_offer
from deploy.ota.exceptions import DeliveryError
from deploy.ota.sender import OfferSender, final_outcome, reply_reason

log = logging.getLogger(__name__)

#: ``ota/state`` outcome step → rollout step.
STEP_OF_OUTCOME = {
    "committed": "committed",
    "rolled_back": "rolled_back",
    "rejected": "rejected",
    "shadow": "shadow",
}


class MalformedStateError(DeliveryError):
    """A retained ``ota/state`` that its model refuses."""


def read_ota_state(
    address: BrokerAddress, prefix: str, device_id: str, wait_s: float
) -> OtaStateMessage | None:
    """The device's retained ``ota/state`` (None when none arrives within ``wait_s``), parsed by
    its model; :class:`MalformedStateError` (one line) when the model refuses it."""
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
            try:
                state = parse_message("ota/state", payload)
            except MessageError as exc:
                problem = str(exc).removeprefix("ota/state: ")
                raise MalformedStateError(
                    f"device {device_id} sent a malformed ota/state: {problem}"
                ) from None
            if state is not None:  # None: a cleared retained message
                return cast(OtaStateMessage, state)
    finally:
        client.disconnect()
        client.loop_stop()


def _version(state: OtaStateMessage | None) -> int | None:
    return state.current if state is not None else None


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
        try:
            state = read_ota_state(self.address, self.prefix, device_id, self.state_wait_s)
        except MalformedStateError:
            return None  # not known: the offer that follows halts on it, naming the problem
        return _version(state)

    def offer(self, device_id: str) -> DeviceOutcome:
        """Check the device answers, offer the bundle inline, wait for the final outcome."""
        return self._deliver(device_id, "serve")

    def offer_shadow(self, device_id: str) -> DeviceOutcome:
        """Offer the bundle in shadow mode: the device holds it beside the serving model."""
        return self._deliver(device_id, "shadow")

    def promote(self, device_id: str) -> DeviceOutcome:
        """Promote the device's shadow candidate (this bundle) through the normal install."""
        return self._deliver(device_id, "promote")

    def _before_offer(self, device_id: str) -> tuple[int | None, DeviceOutcome | None]:
        """(the version the device serves, the outcome when nothing is to be sent)."""
        try:
            state = read_ota_state(self.address, self.prefix, device_id, self.state_wait_s)
        except DeliveryError as exc:  # a malformed ota/state: one line, the device halts
            return None, DeviceOutcome("timeout", None, str(exc))
        if state is None:
            return None, DeviceOutcome(
                "timeout",
                None,
                f"no ota/state from {device_id} within {self.state_wait_s:.0f} s "
                "(unknown device or offline)",
            )
        current = state.current
        if current is not None and current == self.version:
            return current, DeviceOutcome("committed", current, "already serving this version")
        if current is not None and current > self.version:
            return current, DeviceOutcome(
                "rejected", current, f"serves a newer version ({current})"
            )
        return current, None

    def _deliver(self, device_id: str, mode: OfferMode) -> DeviceOutcome:
        current, settled = self._before_offer(device_id)
        if settled is not None:
            return settled
        cid = secrets.token_hex(8)
        source = inline_source(self.archive, secrets.token_hex(8), self.chunk_size)
        offer = make_offer(self.archive, source, cid)
        if mode != "serve":
            data = offer.model_dump(by_alias=True) | {"mode": mode}
            offer = OtaOffer.model_validate(data | ({"source": None} if mode == "promote" else {}))
        try:
            with OfferSender(self.address, self.prefix, device_id) as sender:
                sender.connect()
                reply = sender.deliver(offer, self.archive, self.reply_wait_s)
                if not reply.ok:
                    return DeviceOutcome("rejected", current, reply_reason(reply))
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
