"""The appliance daemon: start-up steps, wiring of its parts, the main loop, shutdown.

The parts, each with one job and wired by small ports:

* :class:`~deploy.appliance.worker.ScanWorker` - the scan queue, one slide at a time, cancel;
  every scan ends in one result through the :class:`~deploy.appliance.publisher.ResultPublisher`
  (the durable outbox, delivered over MQTT by the :class:`~deploy.mqtt.OutboxPump`);
* :class:`~deploy.appliance.commands.CommandRouter` - ``cmd/<verb>`` -> handler -> the one reply;
* :class:`~deploy.appliance.telemetry.Telemetry` - retained status, metrics, health file;
* :class:`~deploy.appliance.ota.OtaController` - typed offers, transfer, install, ``ota/state``.

Start-up is a list of short steps (state dir, outbox, broker, MQTT, model store, scanner = bridge
+ backends + engine warm-up, workers); each is logged and reported to systemd as ``STATUS=``,
and ``READY=1`` follows the last one.  The workers (scan, publish, OTA) run under the
:class:`Supervisor`; the main thread watches them, pets the systemd watchdog, refreshes the
health file, republishes the retained status when it changes and publishes metrics.

Shutdown (SIGTERM/SIGINT -> :meth:`Appliance.request_stop`): no new scans are accepted; waiting
ones end ``cancelled``; the running slide may *finish* within ``scan.shutdown_grace_s``, past
that it is cancelled between fields (a ``cancelled`` result, nothing half-written).  Every such
result is committed to the outbox.  Then ``stopped`` is published (retained) and the process
exits 0.  Results not yet acknowledged stay in the outbox and are delivered after the next start.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from paho.mqtt.properties import Properties

from deploy import __version__
from deploy.appliance.base import ModelSwapper, ScannerInfo, ScanRequest, SlideScanner
from deploy.appliance.commands import CommandFailed, CommandRouter
from deploy.appliance.notify import sd_notify, watchdog_interval_s
from deploy.appliance.ota import OtaController, OtaPorts, OtaSettings, chunk_filter
from deploy.appliance.publisher import OutboxPublisher
from deploy.appliance.queue import ScanQueue
from deploy.appliance.results import Identity
from deploy.appliance.status import Snapshot, StatusTracker
from deploy.appliance.supervisor import Supervisor
from deploy.appliance.telemetry import Telemetry, TelemetryPorts
from deploy.appliance.worker import SCAN_ERRORS, ScanPorts, ScanWorker
from deploy.broker import BrokerAddress, EmbeddedBroker, parse_broker_url
from deploy.config import AppConfig
from deploy.exceptions import ScanRejectedError, ServiceError
from deploy.mqtt import MqttLink, OutboxPump, Topics
from deploy.ota.delivery import OtaOffer
from deploy.outbox import Outbox

log = logging.getLogger(__name__)

OUTBOX_FILE = "outbox.sqlite"
LOOP_PERIOD_S = 0.25
SETTLE_INFLIGHT_S = 2.0


class Appliance:
    """The scanning appliance; construct, then :meth:`start`, :meth:`run`, :meth:`shutdown`."""

    def __init__(
        self,
        config: AppConfig,
        state_dir: Path,
        scanner: SlideScanner,
        ota: OtaSettings | None = None,
    ) -> None:
        self.config = config
        self.state_dir = state_dir
        self.scanner = scanner
        self.identity = Identity(config.device.id, uuid.uuid4().hex)
        self.topics = Topics(config.mqtt.prefix, config.device.id)
        self.queue = ScanQueue(config.scan.queue_size)
        self.status = StatusTracker(self.identity, __version__)
        o = config.outbox
        self.outbox = Outbox(state_dir / OUTBOX_FILE, o.max_rows, o.max_bytes, o.synchronous)
        self.router = CommandRouter(
            config.device.id, config.mqtt.max_command_bytes, self._publish_reply
        )
        self.supervisor = Supervisor(config.service.restart_max, config.service.restart_window_s)
        self.broker: EmbeddedBroker | None = None
        self.link: MqttLink | None = None
        self.pump: OutboxPump | None = None
        self._address: BrokerAddress | None = None
        self._stop_requested = threading.Event()
        self._closed = False
        self.ota = OtaController(
            state_dir,
            self._ota_ports(),
            scanner if isinstance(scanner, ModelSwapper) else None,
            ota if ota is not None else OtaSettings.from_config(config.ota),
        )
        self.worker = ScanWorker(self.identity, scanner, self.queue, self._scan_ports())
        self.telemetry = Telemetry(
            self.status, self.worker.counters, state_dir, self._telemetry_ports()
        )
        self._register_commands()

    # ----------------------------------------------------------------- wiring

    def _scan_ports(self) -> ScanPorts:
        publisher = OutboxPublisher(
            self.outbox, self.topics.result, self._notify_pump, self._result_error
        )
        return ScanPorts(
            publisher=publisher,
            has_room=self.outbox.has_room,
            slide_started=self.ota.slide_started,
            slide_finished=self.ota.slide_finished,
            status_changed=self._status_changed,
            record_error=self.status.record_error,
            info=lambda: self.status.info,
            model_seen=self._note_model,
        )

    def _ota_ports(self) -> OtaPorts:
        return OtaPorts(
            slide_lock=lambda: self.worker.slide_lock,
            publish=lambda topic, payload, retain: self._publish(topic, payload, 1, retain),
            set_updating=self._set_updating,
            model_loaded=self._model_loaded,
            connected=self._connected,
            base_topic=self.topics.base,
            prefix=self.topics.prefix,
            device_id=self.topics.device_id,
        )

    def _telemetry_ports(self) -> TelemetryPorts:
        return TelemetryPorts(
            publish=self._publish,
            snapshot=self.snapshot,
            counters=self._link_counters,
            connected=self._connected,
            dead_workers=self.supervisor.dead,
            status_topic=self.topics.status,
            metrics_topic=self.topics.metrics,
        )

    def _register_commands(self) -> None:
        self.router.register("scan", "cmd_scan", self._cmd_scan)
        self.router.register("cancel", "cmd_cancel", self._cmd_cancel)
        self.router.register("status", "cmd_status", self._cmd_status)
        self.router.register("ota", "cmd_ota", self.ota.handle_offer, model=OtaOffer)

    # ----------------------------------------------------------------- start-up steps

    def steps(self) -> list[tuple[str, Callable[[], None]]]:
        """The start-up steps, in order."""
        return [
            ("state directory", self._step_state_dir),
            ("outbox", self._step_outbox),
            ("broker", self._step_broker),
            ("mqtt", self._step_mqtt),
            ("model store", self._step_model_store),
            ("scanner (bridge, camera, engine warm-up)", self._step_scanner),
            ("workers", self._step_workers),
        ]

    def start(self) -> None:
        """Run every start-up step, then tell systemd we are ready."""
        for name, step in self.steps():
            log.info("start-up: %s", name)
            sd_notify(f"STATUS=starting: {name}")
            step()
        self.publish_status(force=True)
        sd_notify("READY=1")
        sd_notify("STATUS=ready")
        log.info("appliance %s ready (boot %s)", self.identity.device_id, self.identity.boot_id)

    def _step_state_dir(self) -> None:
        try:
            (self.state_dir / "run").mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ServiceError(f"state dir {self.state_dir}: {exc.strerror}") from exc

    def _step_outbox(self) -> None:
        self.outbox.open()

    def _step_broker(self) -> None:
        address = parse_broker_url(self.config.mqtt.broker)
        if address.scheme == "embedded":
            self.broker = EmbeddedBroker(port=address.port)
            address = self.broker.start()
        self._address = address

    def _step_mqtt(self) -> None:
        if self._address is None:
            raise ServiceError("MQTT started before the broker step")
        # Inline OTA chunks arrive outside cmd/+; subscribe to them only when OTA can run.
        extra = [chunk_filter(self.topics.base)] if self.ota.enabled else []
        self.link = MqttLink(
            self.config.mqtt,
            self._address,
            self.topics,
            on_command=self._on_command,
            on_online=self._on_online,
            extra_filters=extra,
        )
        self.pump = OutboxPump(self.outbox, self.link, self.config.mqtt.max_inflight)
        self.link.on_puback = self.pump.on_puback
        self.link.start()

    def _step_model_store(self) -> None:
        self.ota.open()
        self.ota.publish_state()

    def _step_scanner(self) -> None:
        try:
            self.status.info = self.scanner.open()
        except SCAN_ERRORS as exc:
            self.status.fatal = f"scanner: {exc}"
            self.status.record_error("scanner_unavailable", str(exc))
            self.publish_status(force=True)
            raise ServiceError(f"scanner could not start: {exc}") from exc
        if self.config.scan.scan_on_insert:
            self.scanner.set_slide_listener(self._on_slide_inserted)

    def _step_workers(self) -> None:
        if self.pump is None:
            raise ServiceError("workers started before MQTT")
        self.supervisor.add("scan", self.worker.run)
        self.supervisor.add("publish", self.pump.run)
        if self.ota.enabled:
            self.supervisor.add("ota", self.ota.run)
        self.supervisor.start()

    # ----------------------------------------------------------------- scanning, commands

    @property
    def counters(self) -> Any:
        """The scan counters (metrics)."""
        return self.worker.counters

    @property
    def committed(self) -> Any:
        """Results committed to the outbox in this run (newest last)."""
        return self.worker.committed

    def submit(self, request: ScanRequest) -> int:
        """Queue a scan; returns its queue position.  Raises ScanRejectedError."""
        if request.plan not in self.config.scan.plans:
            known = ", ".join(self.config.scan.plans)
            raise ScanRejectedError(f"unknown plan {request.plan!r} (known: {known})", "invalid")
        return self.worker.submit(request)

    def _on_slide_inserted(self, slide_id: str) -> None:
        scan = self.config.scan
        self.worker.on_slide_inserted(slide_id, scan.fields, scan.plan)

    def _cmd_scan(self, request: dict[str, Any]) -> dict[str, Any]:
        scan = ScanRequest(
            slide_id=request["slide_id"],
            fields=int(request.get("fields", self.config.scan.fields)),
            plan=str(request.get("plan", self.config.scan.plan)),
            source="mqtt",
        )
        try:
            position = self.submit(scan)
        except ScanRejectedError as exc:
            raise CommandFailed(exc.code, str(exc)) from exc
        return {"scan_id": scan.scan_id, "slide_id": scan.slide_id, "position": position}

    def _cmd_cancel(self, request: dict[str, Any]) -> dict[str, Any]:
        cancelled = self.queue.cancel(request.get("scan_id"))
        if not cancelled:
            raise CommandFailed("not_found", "no such scan queued or running")
        return {"cancelled": cancelled}

    def _cmd_status(self, request: dict[str, Any]) -> dict[str, Any]:
        return {"status": self.publish_status(force=True)}

    def _on_command(self, topic: str, payload: bytes, properties: Properties | None) -> None:
        verb = self.topics.verb_of(topic)
        if verb is None and topic.startswith(f"{self.topics.base}/ota/chunk/"):
            self.ota.on_chunk(topic, payload)
            return
        if verb is None:
            log.debug("ignoring message on %s", topic)
            return
        correlation = getattr(properties, "CorrelationData", None) if properties else None
        response_topic = self.link.response_topic(properties) if self.link else None
        self.router.handle(
            verb, payload, correlation if isinstance(correlation, bytes) else None, response_topic
        )

    def _publish_reply(
        self, verb: str, payload: bytes, correlation: bytes | None, response_topic: str | None
    ) -> None:
        if self.link is None:
            return
        props = self.link.reply_properties(correlation)
        # The documented reply topic always gets it; an MQTT 5 response topic gets a copy.
        topics = [self.topics.reply(verb)]
        if response_topic is not None and response_topic not in topics:
            topics.append(response_topic)
        for topic in topics:
            self.link.publish(topic, payload, qos=1, properties=props)

    # ----------------------------------------------------------------- status, link

    def snapshot(self) -> Snapshot:
        """The current queue and outbox state."""
        q = self.queue
        return Snapshot(q.current, q.depth, q.capacity, self.outbox.stats())

    def publish_status(self, force: bool = False) -> dict[str, Any]:
        """Publish the retained status if it changed (or ``force``); returns it."""
        return self.telemetry.publish_status(force)

    def metrics(self) -> dict[str, Any]:
        """The ``omis.metrics/1`` document."""
        return self.telemetry.metrics()

    def _publish(self, topic: str, payload: bytes, qos: int, retain: bool) -> None:
        if self.link is not None:
            self.link.publish(topic, payload, qos=qos, retain=retain)

    def _connected(self) -> bool:
        return bool(self.link and self.link.connected.is_set())

    def _link_counters(self) -> dict[str, int]:
        pump, link = self.pump, self.link
        counters = {
            "results_published": pump.published if pump else 0,
            "results_acked": pump.acked if pump else 0,
            "results_rejected": pump.rejected if pump else 0,
            "mqtt_connects": link.connects if link else 0,
            "worker_restarts": len(self.supervisor.restarts),
        }
        counters.update({f"commands_{k}": v for k, v in self.router.counts.items()})
        return counters

    def _status_changed(self) -> None:
        self.publish_status()

    def _notify_pump(self) -> None:
        if self.pump is not None:
            self.pump.notify()

    def _result_error(self, code: str, message: str) -> None:
        self.status.record_error(code, message)
        self.publish_status()

    def _set_updating(self, updating: bool) -> None:
        self.status.updating = updating
        self.publish_status()

    def _model_loaded(self, info: ScannerInfo) -> None:
        self.status.info = info
        self.publish_status(force=True)

    def _note_model(self, model: dict[str, Any] | None) -> None:
        # The scanner may have followed a switch made by another process (omis ota rollback).
        info = self.status.info
        if info is not None and model is not None and model != info.model:
            self.status.info = ScannerInfo(model, info.engine, info.firmware)

    def _on_online(self) -> None:
        # Retained state is lost when the broker restarts: republish on every connect.
        self.publish_status(force=True)
        self.ota.publish_state()
        if self.pump is not None:
            self.pump.reconnected()

    # ----------------------------------------------------------------- main loop, shutdown

    def request_stop(self) -> None:
        """Ask :meth:`run` to shut down (signal-safe: only sets a flag)."""
        self._stop_requested.set()

    @property
    def stopping(self) -> bool:
        """True once a stop was requested."""
        return self._stop_requested.is_set()

    def run(self, until: Callable[[], bool] | None = None) -> None:
        """Supervise until a stop is requested or ``until()`` is true.

        Raises :class:`ServiceError` when a worker exceeds its restart cap.
        """
        svc = self.config.service
        watchdog = watchdog_interval_s()
        next_dog = next_health = 0.0
        next_metrics = time.monotonic() + svc.metrics_interval_s
        while not self._stop_requested.is_set() and not (until and until()):
            now = time.monotonic()
            try:
                self.supervisor.check()
            except ServiceError as exc:
                self.status.fatal = str(exc)
                self.status.record_error("worker_failed", str(exc))
                self.publish_status(force=True)
                self.telemetry.write_health()
                raise
            if watchdog is not None and now >= next_dog:
                sd_notify("WATCHDOG=1")
                next_dog = now + watchdog
            if now >= next_health:
                self.telemetry.write_health()
                next_health = now + svc.health_interval_s
            if now >= next_metrics:
                self.telemetry.publish_metrics()
                next_metrics = now + svc.metrics_interval_s
            self.publish_status()
            self._stop_requested.wait(LOOP_PERIOD_S)

    def run_batch(self, requests: Iterable[ScanRequest], ack_timeout_s: float) -> None:
        """Scan ``requests`` one after another, then wait up to ``ack_timeout_s`` for PUBACKs."""
        for request in requests:
            while True:
                try:
                    self.submit(request)
                    break
                except ScanRejectedError as exc:
                    if exc.code != "queue_full":
                        raise
                    self.queue.wait_idle(0.2)
        self.run(until=lambda: self.queue.current is None and self.queue.depth == 0)
        if self.pump is not None and not self.stopping:
            self.pump.drain(ack_timeout_s)

    def _settle_inflight(self) -> None:
        pump = self.pump
        if pump is None or not self._connected():
            return
        deadline = time.monotonic() + SETTLE_INFLIGHT_S
        while pump.inflight and time.monotonic() < deadline:
            time.sleep(0.05)

    def shutdown(self) -> None:
        """Finish or cancel the current slide, stop workers, publish ``stopped`` (idempotent)."""
        if self._closed:
            return
        self._closed = True
        self._stop_requested.set()
        sd_notify("STOPPING=1")
        self.worker.finish(self.config.scan.shutdown_grace_s)
        self.ota.stop()
        self._settle_inflight()
        self.supervisor.stop()
        if self.link is not None:
            if self.status.fatal is None:
                self.publish_status()
            self.link.close()
        self.scanner.set_slide_listener(None)
        self.scanner.close()
        self.outbox.close()
        if self.broker is not None:
            self.broker.close()
        log.info("appliance stopped")
