"""The appliance's MQTT side: the (optional) embedded broker, the link and the outbox pump.

Availability (``online`` on every connect, ``stopped`` on a clean exit, ``offline`` as the last
will) is the link's own job; this class starts and stops the three pieces in order and answers
the small questions the other parts ask (connected? counters? publish this).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from deploy.broker import BrokerAddress, EmbeddedBroker, parse_broker_url
from deploy.config import MqttConfig
from deploy.exceptions import ServiceError
from deploy.mqtt import CommandCallback, MqttLink, OutboxPump, Topics
from deploy.outbox import Outbox

SETTLE_INFLIGHT_S = 2.0


class Transport:
    """Broker (when embedded), MQTT link and outbox pump of one appliance."""

    def __init__(
        self,
        config: MqttConfig,
        topics: Topics,
        outbox: Outbox,
        *,
        receipts: bool = True,
        receipt_timeout_s: float = 300.0,
    ) -> None:
        self.config = config
        self.receipts = receipts  # outbox rows wait for the archive's receipt
        self.receipt_timeout_s = receipt_timeout_s
        self.topics = topics
        self.outbox = outbox
        self.broker: EmbeddedBroker | None = None
        self.link: MqttLink | None = None
        self.pump: OutboxPump | None = None
        self._address: BrokerAddress | None = None

    def start_broker(self) -> None:
        """Resolve the broker URL; start the embedded broker when it asks for one."""
        address = parse_broker_url(self.config.broker)
        if address.scheme == "embedded":
            self.broker = EmbeddedBroker(port=address.port)
            address = self.broker.start()
        self._address = address

    def start_link(
        self, on_command: CommandCallback, on_online: Callable[[], None], extra: list[str]
    ) -> OutboxPump:
        """Connect (in the background, with back-off) and create the outbox pump."""
        if self._address is None:
            raise ServiceError("MQTT started before the broker step")
        self.link = MqttLink(
            self.config,
            self._address,
            self.topics,
            on_command=on_command,
            on_online=on_online,
            extra_filters=extra,
        )
        self.pump = OutboxPump(
            self.outbox,
            self.link,
            self.config.max_inflight,
            receipts=self.receipts,
            receipt_timeout_s=self.receipt_timeout_s,
        )
        self.link.on_puback = self.pump.on_puback
        if self.receipts:
            self.link.on_receipt = self.pump.on_receipt
        self.link.start()
        return self.pump

    def publish(self, topic: str, payload: bytes, qos: int, retain: bool) -> None:
        """Publish through the link (dropped before it exists; results use the outbox)."""
        if self.link is not None:
            self.link.publish(topic, payload, qos=qos, retain=retain)

    def connected(self) -> bool:
        """True while the link is connected."""
        return bool(self.link and self.link.connected.is_set())

    def notify(self) -> None:
        """A result was committed: wake the pump."""
        if self.pump is not None:
            self.pump.notify()

    def counters(self) -> dict[str, int]:
        """Delivery counters for the metrics."""
        pump, link = self.pump, self.link
        return {
            "results_published": pump.published if pump else 0,
            "results_acked": pump.acked if pump else 0,
            "results_rejected": pump.rejected if pump else 0,
            "results_receipted": pump.receipted if pump else 0,
            "results_resent": pump.resent if pump else 0,
            "mqtt_connects": link.connects if link else 0,
        }

    def settle_inflight(self) -> None:
        """Give unacknowledged publishes a moment to be acknowledged before stopping."""
        pump = self.pump
        if pump is None or not self.connected():
            return
        deadline = time.monotonic() + SETTLE_INFLIGHT_S
        while pump.inflight and time.monotonic() < deadline:
            time.sleep(0.05)

    def close(self, clean: bool = True) -> None:
        """Close the link and the embedded broker.

        Availability says ``stopped`` after a clean exit and ``offline`` (as the last will
        would) after an exit in error.
        """
        if self.link is not None:
            self.link.close(availability="stopped" if clean else "offline")
        if self.broker is not None:
            self.broker.close()
