"""``omis ota publish``: the sender's side of an MQTT OTA offer (paho-mqtt 2.x, callback API v2).

Fails fast, sending nothing, when the device is not there: a running device keeps a retained
``ota/state`` (and ``availability`` = ``online``) on the broker, so none within
``presence_s`` means no such device (or one that never ran), and ``offline``/``stopped``
means it is down.  Then it publishes the offer on ``cmd/ota`` and waits up to ``answer_s`` for
the device to take it (``ota/state`` progress naming the offer's correlation id) or refuse it
(the reply); only then, for an inline transfer, every chunk (QoS 1), re-sending the chunks the
device lists on ``ota/need/<transfer-id>``; it waits for the device's reply on
``cmd/ota/reply`` carrying the offer's correlation id, then (:meth:`OfferSender.outcome`) for
the install's final outcome on the retained ``ota/state``: ``committed``, ``rolled_back`` or
``rejected``.  A reply only says the bundle arrived; the outcome says whether it serves.
Each step is logged at DEBUG (``omis ota publish -v``).
"""

from __future__ import annotations

import json
import logging
import queue
import ssl
import time
from pathlib import Path
from typing import Any, cast

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from deploy.broker import BrokerAddress
from deploy.messages.ota_state import OtaStateMessage
from deploy.messages.parsing import MessageError, parse_message
from deploy.messages.reply import ReplyMessage
from deploy.ota.delivery import InlineSource, OtaOffer, chunk_topic, iter_chunks, need_topic
from deploy.ota.exceptions import DeliveryError

log = logging.getLogger(__name__)
QOS = 1
PRESENCE_S = 5.0  # retained messages arrive right after SUBACK; this is generous
ANSWER_S = 10.0  # a running device takes (or refuses) an offer at once
RETAINED_GRACE_S = 0.5
#: ``ota/state`` progress steps that end an install.
FINAL_STEPS = frozenset({"committed", "rolled_back", "rejected", "shadow"})


class OfferSender:
    """One MQTT connection that delivers one offer; a context manager, ``close()`` idempotent."""

    def __init__(self, address: BrokerAddress, prefix: str, device_id: str) -> None:
        self.address = address
        self.base = f"{prefix}/{device_id}"
        self.prefix = prefix
        self.device_id = device_id
        self._inbox: queue.Queue[tuple[str, bytes]] = queue.Queue()
        self._client: paho.Client | None = None
        self._states: list[OtaStateMessage] = []  # ota/state seen while waiting for the reply

    @property
    def state_topic(self) -> str:
        """The device's retained ``ota/state`` topic."""
        return f"{self.base}/ota/state"

    def connect(self, timeout_s: float = 10.0) -> None:
        """Connect and subscribe to the reply and need topics."""
        client = paho.Client(CallbackAPIVersion.VERSION2, protocol=MQTTProtocolVersion.MQTTv5)
        if self.address.tls:
            client.tls_set(cert_reqs=ssl.CERT_REQUIRED)
        client.on_message = self._on_message
        try:
            client.connect(self.address.host, self.address.port or 1883, keepalive=30)
        except (OSError, ValueError) as exc:
            raise DeliveryError(f"cannot connect to {self.address}: {exc}") from exc
        self._client = client
        client.loop_start()
        topics = (
            f"{self.base}/cmd/ota/reply",
            f"{self.base}/ota/need/+",
            self.state_topic,
            f"{self.base}/availability",
        )
        for topic in topics:
            info = client.subscribe(topic, qos=QOS)
            if info[0] != paho.MQTT_ERR_SUCCESS:
                raise DeliveryError(f"cannot subscribe to {topic}")
        log.debug("step: connected to %s, subscribed to %s/...", self.address, self.base)

    def check_present(self, presence_s: float = PRESENCE_S) -> OtaStateMessage:
        """The device's retained ``ota/state``; raises at once, having sent nothing, when the
        device has none (no such device) or says it is offline."""
        deadline = time.monotonic() + presence_s
        state: OtaStateMessage | None = None
        availability: str | None = None
        while state is None or availability is None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                topic, payload = self._inbox.get(timeout=remaining)
            except queue.Empty:
                break
            if topic == self.state_topic:
                state = self._state(payload)
                if state is None:
                    continue  # a cleared retained state: no device there
                # Retained messages come right after SUBACK: availability, if any, is close.
                deadline = min(deadline, time.monotonic() + RETAINED_GRACE_S)
            elif topic.endswith("/availability"):
                availability = payload.decode("utf-8", "replace").strip()
        if availability is not None and availability != "online":
            raise DeliveryError(
                f"device {self.device_id} is {availability!r} on {self.address} (retained "
                "availability); nothing sent"
            )
        if state is None:
            raise DeliveryError(
                f"device {self.device_id} has no ota/state on {self.address} within "
                f"{presence_s:.0f} s: no such device, or it never ran there; nothing sent"
            )
        log.debug("step: device %s is present (current model v%s)", self.device_id, state.current)
        return state

    def _on_message(self, client: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
        self._inbox.put((msg.topic, bytes(msg.payload)))

    def _publish(self, topic: str, payload: bytes, timeout_s: float) -> None:
        if self._client is None:
            raise DeliveryError("sender is not connected")
        info = self._client.publish(topic, payload, qos=QOS)
        try:
            info.wait_for_publish(timeout_s)
        except (RuntimeError, ValueError) as exc:
            raise DeliveryError(f"publish to {topic} failed: {exc}") from exc
        if not info.is_published():
            raise DeliveryError(f"publish to {topic} not acknowledged in {timeout_s:.0f} s")

    def send_chunks(self, archive: Path, source: InlineSource, only: set[int] | None = None) -> int:
        """Publish (some of) the archive's chunks; returns how many."""
        sent = 0
        for index, block in iter_chunks(archive, source.chunk_size):
            if only is None or index in only:
                topic = chunk_topic(self.prefix, self.device_id, source.transfer_id, index)
                self._publish(topic, block, 30.0)
                sent += 1
        return sent

    def deliver(
        self, offer: OtaOffer, archive: Path | None, wait_s: float, answer_s: float = ANSWER_S
    ) -> ReplyMessage:
        """Send the offer (and chunks); return the device's reply, or raise on timeout.

        Raises within ``answer_s`` when the device neither takes nor refuses the offer, and at
        once when the device sends a reply or ``ota/state`` its model refuses.
        """
        source = offer.source
        if isinstance(source, InlineSource) and archive is None:
            raise DeliveryError("an inline offer needs its archive")
        self._publish(f"{self.base}/cmd/ota", offer.to_json(), 30.0)
        log.debug("step: offer %s published on %s/cmd/ota", offer.correlation_id, self.base)
        early = self._await_taken(offer, answer_s)
        if early is not None:
            return early
        if isinstance(source, InlineSource) and archive is not None:
            sent = self.send_chunks(archive, source)
            log.debug("step: sent %d chunk(s) of %d bytes", sent, source.chunk_size)
        need = need_topic(self.prefix, self.device_id, getattr(source, "transfer_id", "-"))
        while True:
            try:
                topic, payload = self._inbox.get(timeout=wait_s)
            except queue.Empty:
                raise DeliveryError(
                    f"no reply from {self.device_id} within {wait_s:.0f} s"
                ) from None
            if topic == need and isinstance(source, InlineSource) and archive is not None:
                asked = _json(payload).get("missing")
                missing = {i for i in asked if type(i) is int} if isinstance(asked, list) else set()
                log.info("device asks for %d chunk(s) again", len(missing))
                self.send_chunks(archive, source, missing)
                continue
            reply = self._answer(topic, payload, offer)
            if reply is not None:
                return reply

    def _await_taken(self, offer: OtaOffer, answer_s: float) -> ReplyMessage | None:
        """Wait until the device takes the offer (None) or answers it at once (the reply)."""
        deadline = time.monotonic() + answer_s
        while (remaining := deadline - time.monotonic()) > 0:
            try:
                topic, payload = self._inbox.get(timeout=remaining)
            except queue.Empty:
                break
            taken = len(self._states)
            reply = self._answer(topic, payload, offer)
            if reply is not None:
                return reply
            if any(_progress_of(s, offer.correlation_id) for s in self._states[taken:]):
                return None
        raise DeliveryError(
            f"device {self.device_id} did not take the offer within {answer_s:.0f} s (no "
            "ota/state progress, no reply): it is not running or not subscribed; no chunk sent"
        )

    def _answer(self, topic: str, payload: bytes, offer: OtaOffer) -> ReplyMessage | None:
        """The reply to ``offer`` when ``topic`` carries it; an ``ota/state`` is kept (and its
        progress logged).  Either is parsed by its model: a refusal is a :class:`DeliveryError`."""
        if topic == self.state_topic:
            state = self._state(payload)
            if state is not None:
                self._states.append(state)
                _log_progress(state, offer.correlation_id)
            return None
        if not topic.endswith("/cmd/ota/reply"):
            return None
        reply = cast(ReplyMessage | None, self._parsed("reply", payload))
        if reply is None or reply.correlation_id != offer.correlation_id:
            return None  # the answer to another offer
        if reply.device_id != self.device_id:
            raise DeliveryError(
                f"device {self.device_id} sent a malformed reply: device_id {reply.device_id!r}"
            )
        log.debug("step: reply from %s: ok=%s", self.device_id, reply.ok)
        return reply

    def _state(self, payload: bytes) -> OtaStateMessage | None:
        return cast(OtaStateMessage | None, self._parsed("ota/state", payload))

    def _parsed(self, kind: str, payload: bytes) -> Any:
        """``payload`` parsed by the model of ``kind`` (None: empty); one line when refused."""
        try:
            return parse_message(kind, payload)
        except MessageError as exc:
            problem = str(exc).removeprefix(f"{kind}: ")
            raise DeliveryError(
                f"device {self.device_id} sent a malformed {kind}: {problem}"
            ) from None

    def outcome(self, offer: OtaOffer, wait_s: float) -> OtaStateMessage:
        """Wait for the final ``ota/state`` of this offer's install; return that state.

        The device names the offer's correlation id in ``progress`` while it installs, so an
        older retained state (even of the same version) is never taken for this outcome.
        Raises :class:`DeliveryError` when no final state arrives within ``wait_s``.
        """
        deadline = time.monotonic() + wait_s
        last: dict[str, Any] | None = None  # the latest progress of this offer
        while True:
            for state in self._states:
                if _final_step(state, offer.correlation_id) is not None:
                    return state
                last = _progress_of(state, offer.correlation_id) or last
            self._states.clear()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise DeliveryError(
                    f"{self.device_id} received the bundle but reported no final outcome "
                    f"(committed, rolled back, rejected) within {wait_s:.0f} s"
                    f"{_still_at(last)}"
                )
            try:
                topic, payload = self._inbox.get(timeout=remaining)
            except queue.Empty:
                continue
            if topic == self.state_topic:
                self._answer(topic, payload, offer)

    def close(self) -> None:
        """Disconnect (idempotent)."""
        client, self._client = self._client, None
        if client is not None:
            client.disconnect()
            client.loop_stop()

    def __enter__(self) -> OfferSender:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _log_progress(state: OtaStateMessage, correlation_id: str) -> None:
    progress = _progress_of(state, correlation_id)
    if progress is not None:
        log.debug("step: device at %s", progress.get("step"))


def _progress_of(state: OtaStateMessage, correlation_id: str) -> dict[str, Any] | None:
    progress = state.progress
    if progress is None or progress.get("correlation_id") != correlation_id:
        return None
    return progress


def _final_step(state: OtaStateMessage, correlation_id: str) -> str | None:
    step = (_progress_of(state, correlation_id) or {}).get("step")
    return step if step in FINAL_STEPS else None


def _still_at(progress: dict[str, Any] | None) -> str:
    """Where the install stood when the wait ended (a hardware fault extends a health period)."""
    if progress is None:
        return ""
    where = f"; last step: {progress.get('step')}"
    fault = progress.get("hardware_fault")
    if fault:
        where += f", health period extended by a hardware fault ({fault})"
    return where


def final_outcome(state: OtaStateMessage, correlation_id: str) -> dict[str, Any]:
    """``{"outcome", "version", "reason"}`` of a final ``ota/state`` for this offer."""
    progress = state.progress or {}
    last = state.last_outcome if isinstance(state.last_outcome, dict) else {}
    return {
        "outcome": _final_step(state, correlation_id),
        "version": progress.get("version"),
        "reason": progress.get("reason") or last.get("reason", ""),
    }


def _json(payload: bytes) -> dict[str, Any]:
    """A chunk request (``ota/need``: no message model; garbage asks for nothing)."""
    try:
        data = json.loads(payload)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def reply_reason(reply: ReplyMessage) -> str:
    """Why the device refused an offer (the reply's error message)."""
    return reply.error.message if reply.error is not None else "refused without a reason"
