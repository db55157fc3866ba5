"""Commands over MQTT: ``cmd/<verb>`` (and inline OTA chunks) in, one reply out.

:class:`CommandIntake` registers the appliance's verbs with the :class:`CommandRouter` (which
owns validation and the reply life cycle), takes messages from the MQTT link and publishes the
router's replies on ``…/cmd/<verb>/reply`` (plus a copy to an MQTT 5 response topic).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from paho.mqtt.properties import Properties

from deploy.appliance.base import ScanRequest
from deploy.appliance.commands import CommandFailed, CommandRouter
from deploy.appliance.ota import OtaController
from deploy.config import ScanConfig
from deploy.exceptions import ScanRejectedError
from deploy.messages.commands import CancelCommand, ScanCommand, StatusCommand
from deploy.mqtt import MqttLink, Topics
from deploy.ota.delivery import OtaOffer
from deploy.requests import reply_topics

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class IntakePorts:
    """What the intake lends from the appliance."""

    submit: Callable[[ScanRequest], int]  # raises ScanRejectedError
    cancel: Callable[[str | None], list[str]]
    status: Callable[[], dict[str, Any]]  # publishes and returns the status
    link: Callable[[], MqttLink | None]


class CommandIntake:
    """The appliance's command verbs, wired to the router and the MQTT link."""

    def __init__(
        self,
        device_id: str,
        max_bytes: int,
        topics: Topics,
        *,
        scan: ScanConfig,
        ota: OtaController,
        ports: IntakePorts,
    ) -> None:
        self.topics = topics
        self.scan = scan
        self.ota = ota
        self.ports = ports
        self.router = CommandRouter(device_id, max_bytes, self.publish_reply)
        self.router.register("scan", "cmd_scan", self._scan, model=ScanCommand)
        self.router.register("cancel", "cmd_cancel", self._cancel, model=CancelCommand)
        self.router.register("status", "cmd_status", self._status, model=StatusCommand)
        self.router.register("ota", "cmd_ota", ota.handle_offer, model=OtaOffer)

    def _scan(self, request: ScanCommand) -> dict[str, Any]:
        scan = ScanRequest(
            slide_id=request.slide_id,
            fields=self.scan.fields if request.fields is None else request.fields,
            plan=self.scan.plan if request.plan is None else request.plan,
            source="mqtt",
        )
        try:
            position = self.ports.submit(scan)
        except ScanRejectedError as exc:
            raise CommandFailed(exc.code, str(exc)) from exc
        return {"scan_id": scan.scan_id, "slide_id": scan.slide_id, "position": position}

    def _cancel(self, request: CancelCommand) -> dict[str, Any]:
        cancelled = self.ports.cancel(request.scan_id)
        if not cancelled:
            raise CommandFailed("not_found", "no such scan queued or running")
        return {"cancelled": cancelled}

    def _status(self, request: StatusCommand) -> dict[str, Any]:
        return {"status": self.ports.status()}

    def on_message(self, topic: str, payload: bytes, properties: Properties | None) -> None:
        """A message on a subscribed topic (MQTT network thread)."""
        verb = self.topics.verb_of(topic)
        if verb is None and topic.startswith(f"{self.topics.base}/ota/chunk/"):
            self.ota.on_chunk(topic, payload)
            return
        if verb is None:
            log.debug("ignoring message on %s", topic)
            return
        link = self.ports.link()
        correlation = getattr(properties, "CorrelationData", None) if properties else None
        response_topic = link.response_topic(properties) if link else None
        self.router.handle(
            verb, payload, correlation if isinstance(correlation, bytes) else None, response_topic
        )

    def publish_reply(
        self, verb: str, payload: bytes, correlation: bytes | None, response_topic: str | None
    ) -> None:
        """Publish one reply on the documented reply topic (a copy to an allowed response topic)."""
        link = self.ports.link()
        if link is None:
            return
        props = link.reply_properties(correlation)
        # The documented reply topic always gets it; an allowed response topic gets a copy.
        topics, refused = reply_topics(
            self.topics.reply(verb), response_topic, self.topics.prefix, self.topics.device_id
        )
        if refused:
            log.warning("cmd/%s: %s", verb, refused)
        for topic in topics:
            link.publish(topic, payload, qos=1, properties=props)
