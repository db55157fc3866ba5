"""The appliance daemon: start-up steps, wiring of its parts, the main loop, shutdown.

The parts, each with one job and wired by small ports:

* :class:`~deploy.appliance.worker.ScanWorker` - the scan queue, one slide at a time, cancel;
  every scan ends in one result through the :class:`~deploy.appliance.publisher.ResultPublisher`
  (the durable outbox, delivered over MQTT by the :class:`~deploy.mqtt.OutboxPump`);
* :class:`~deploy.appliance.intake.CommandIntake` - ``cmd/<verb>`` -> the
  :class:`~deploy.appliance.commands.CommandRouter` -> handler -> the one reply;
* :class:`~deploy.appliance.telemetry.Telemetry` - retained status, metrics, health file;
* :class:`~deploy.appliance.ota.OtaController` - typed offers, transfer, install, ``ota/state``;
* :class:`~deploy.appliance.transport.Transport` - embedded broker, MQTT link, outbox pump.

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

from deploy import __version__
from deploy.appliance.base import ModelSwapper, ScannerInfo, ScanRequest, SlideScanner
from deploy.appliance.connect import ScannerConnector
from deploy.appliance.intake import CommandIntake, IntakePorts
from deploy.appliance.notify import sd_notify, watchdog_interval_s
from deploy.appliance.ota import OtaController, OtaPorts, OtaSettings, chunk_filter
from deploy.appliance.publisher import OutboxPublisher
from deploy.appliance.queue import ScanQueue
from deploy.appliance.results import Identity
from deploy.appliance.shadow import ShadowPublisher
from deploy.appliance.status import Snapshot, StatusTracker
from deploy.appliance.supervisor import Supervisor
from deploy.appliance.telemetry import Telemetry, TelemetryPorts
from deploy.appliance.transport import Transport
from deploy.appliance.worker import SCAN_ERRORS, Counters, ScanPorts, ScanWorker
from deploy.config import AppConfig
from deploy.exceptions import OutboxError, ScanRejectedError, ServiceError
from deploy.mqtt import MqttLink, OutboxPump, Topics
from deploy.ota.watch import StoreWatcher
from deploy.outbox import Outbox

log = logging.getLogger(__name__)

OUTBOX_FILE = "outbox.sqlite"
LOOP_PERIOD_S = 0.25


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
        self.topics = topics = Topics(config.mqtt.prefix, config.device.id)
        self.queue = ScanQueue(config.scan.queue_size)
        self.status = StatusTracker(self.identity, __version__)
        o = config.outbox
        self.outbox = Outbox(state_dir / OUTBOX_FILE, o.max_rows, o.max_bytes, o.synchronous)
        self.transport = Transport(
            config.mqtt,
            topics,
            self.outbox,
            receipts=o.receipts,
            receipt_timeout_s=o.receipt_timeout_s,
        )
        self.supervisor = Supervisor(config.service.restart_max, config.service.restart_window_s)
        self._stop_requested = threading.Event()
        self._closed = False
        self.counters = Counters()
        self.telemetry = Telemetry(
            self.status,
            self.counters,
            state_dir,
            TelemetryPorts(
                publish=self.transport.publish,
                snapshot=self.snapshot,
                counters=self._counters,
                connected=self.transport.connected,
                dead_workers=self.supervisor.dead,
                status_topic=topics.status,
                metrics_topic=topics.metrics,
            ),
        )
        self.ota = OtaController(
            state_dir,
            OtaPorts(
                slide_lock=lambda: self.worker.slide_lock,
                publish=lambda topic, payload, retain: self.transport.publish(
                    topic, payload, 1, retain
                ),
                set_updating=self.telemetry.set_updating,
                model_loaded=self.telemetry.model_loaded,
                connected=self.transport.connected,
                base_topic=topics.base,
                prefix=topics.prefix,
                device_id=topics.device_id,
                shadow_changed=self.telemetry.shadow_changed,
            ),
            scanner if isinstance(scanner, ModelSwapper) else None,
            ota if ota is not None else OtaSettings.from_config(config.ota),
        )
        scan_ports = ScanPorts(
            publisher=OutboxPublisher(
                self.outbox, topics.result, self.transport.notify, self.telemetry.record_error
            ),
            has_room=self.outbox.has_room,
            slide_started=self.ota.slide_started,
            slide_finished=self.ota.slide_finished,
            status_changed=self.telemetry.publish_status,
            record_error=self.status.record_error,
            info=lambda: self.status.info,
            model_seen=self.telemetry.note_model,
            shadow=ShadowPublisher(
                self.outbox, topics.shadow, self.transport.notify, self.telemetry.record_error
            ).commit,
        )
        self.worker = ScanWorker(self.identity, scanner, self.queue, scan_ports, self.counters)
        self.committed = self.worker.committed  # results committed in this run (newest last)
        self._microscope_missing: str | None = None  # why the microscope is not open yet
        self.connector = ScannerConnector(
            scanner,
            self._scanner_opened,
            self._scanner_missing,
            config.scan.connect_retry_initial_s,
            config.scan.connect_retry_max_s,
        )
        self.intake = CommandIntake(
            config.device.id,
            config.mqtt.max_command_bytes,
            topics,
            scan=config.scan,
            ota=self.ota,
            ports=IntakePorts(
                submit=self.submit,
                cancel=self.queue.cancel,
                status=lambda: self.publish_status(force=True),
                link=lambda: self.transport.link,
            ),
        )
        self.router = self.intake.router

    def _counters(self) -> dict[str, int]:
        counters = self.transport.counters()
        counters["worker_restarts"] = len(self.supervisor.restarts)
        counters.update({f"commands_{k}": v for k, v in self.router.counts.items()})
        return counters

    @property
    def link(self) -> MqttLink | None:
        """The MQTT link (None before the ``mqtt`` step)."""
        return self.transport.link

    @property
    def pump(self) -> OutboxPump | None:
        """The outbox pump (None before the ``mqtt`` step)."""
        return self.transport.pump

    # ----------------------------------------------------------------- start-up steps

    def steps(self) -> list[tuple[str, Callable[[], None]]]:
        """The start-up steps, in order (each short; the list is the start-up)."""
        return [
            ("state directory", self._step_state_dir),
            ("outbox", self._step_outbox),
            ("broker", self.transport.start_broker),
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

    def _step_model_store(self) -> None:
        self.ota.open()  # finish or undo an interrupted install before a model loads
        self.ota.publish_state()

    def _step_mqtt(self) -> None:
        # Inline OTA chunks arrive outside cmd/+; subscribe to them only when OTA can run.
        extra = [chunk_filter(self.topics.base)] if self.ota.enabled else []
        self.transport.start_link(self.intake.on_message, self._on_online, extra)

    def _on_online(self) -> None:
        # Retained state is lost when the broker restarts: republish on every connect.
        self.publish_status(force=True)
        self.ota.publish_state()
        if self.pump is not None:
            self.pump.reconnected()

    def _step_scanner(self) -> None:
        try:
            self.connector.open()  # a missing microscope: degraded, retried by a worker
        except SCAN_ERRORS as exc:
            self.status.fatal = f"scanner: {exc}"
            self.status.record_error("scanner_unavailable", str(exc))
            self.publish_status(force=True)
            raise ServiceError(f"scanner could not start: {exc}") from exc

    def _scanner_opened(self, info: ScannerInfo) -> None:
        self._microscope_missing = None
        self.status.info = info
        if self.config.scan.scan_on_insert:
            scan = self.config.scan
            self.scanner.set_slide_listener(
                lambda slide_id: self.worker.on_slide_inserted(slide_id, scan.fields, scan.plan)
            )
        self.publish_status(force=True)

    def _scanner_missing(self, reason: str) -> None:
        self._microscope_missing = reason
        self.status.record_error("scanner_unavailable", reason)
        self.publish_status(force=True)

    def _step_workers(self) -> None:
        if self.pump is None:
            raise ServiceError("workers started before MQTT")
        self.supervisor.add("scan", self.worker.run)
        if not self.connector.connected.is_set():
            self.supervisor.add("microscope", self.connector.run)
        self.supervisor.add("publish", self.pump.run)
        if self.ota.enabled:
            self.supervisor.add("ota", self.ota.run)
        # ota/state follows the store whoever changes it (e.g. a local omis ota install).
        self.supervisor.add("store-watch", StoreWatcher(self.ota.store, self.ota.publish_state).run)
        self.supervisor.start()

    # ----------------------------------------------------------------- scans, status

    def submit(self, request: ScanRequest) -> int:
        """Queue a scan; returns its queue position.  Raises ScanRejectedError."""
        info = self.status.info
        if info is not None and info.model is None:
            raise ScanRejectedError("no model installed yet: offer one with cmd/ota", "no_model")
        if request.plan not in self.config.scan.plans:
            known = ", ".join(self.config.scan.plans)
            raise ScanRejectedError(f"unknown plan {request.plan!r} (known: {known})", "invalid")
        if self._microscope_missing is not None:
            raise ScanRejectedError(
                f"the microscope is not available ({self._microscope_missing}); the device "
                "keeps trying to reach it",
                "unavailable",
            )
        return self.worker.submit(request)

    def snapshot(self) -> Snapshot:
        """The current queue and outbox state."""
        q = self.queue
        return Snapshot(q.current, q.depth, q.capacity, self.outbox.stats())

    def publish_status(self, force: bool = False) -> dict[str, Any]:
        """Publish the retained status if it changed (or ``force``); returns it."""
        return self.telemetry.publish_status(force)

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
                self._check_outbox_file()
                self.telemetry.write_health()
                next_health = now + svc.health_interval_s
            if now >= next_metrics:
                self.telemetry.publish_metrics()
                next_metrics = now + svc.metrics_interval_s
            self.publish_status()
            self._stop_requested.wait(LOOP_PERIOD_S)

    def _check_outbox_file(self) -> None:
        """A deleted or replaced outbox database is recreated (rows kept) and reported as
        ``degraded``; one that cannot be recreated stops the daemon non-zero."""
        try:
            fault = self.outbox.check_file()
        except OutboxError as exc:
            self.status.fatal = str(exc)
            self.status.record_error("outbox_unusable", str(exc))
            self.publish_status(force=True)
            self.telemetry.write_health()
            raise ServiceError(str(exc)) from exc
        if fault is not None:
            self.status.faults.add("outbox_recreated")
            self.status.record_error("outbox_recreated", fault)
            self.publish_status(force=True)

    def run_batch(self, requests: Iterable[ScanRequest], ack_timeout_s: float) -> None:
        """Scan ``requests`` one after another, then wait up to ``ack_timeout_s`` for PUBACKs.

        A one-shot run does not wait for a missing microscope: it fails with the reason.
        """
        if self._microscope_missing is not None:
            raise ServiceError(f"scanner could not start: {self._microscope_missing}")
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

    def shutdown(self) -> None:
        """Finish or cancel the current slide, stop workers, publish ``stopped`` (idempotent)."""
        if self._closed:
            return
        self._closed = True
        self._stop_requested.set()
        sd_notify("STOPPING=1")
        self.worker.finish(self.config.scan.shutdown_grace_s)
        self.ota.stop()
        self.transport.settle_inflight()
        self.supervisor.stop()
        if self.link is not None and self.status.fatal is None:
            self.publish_status()
        self.transport.close(clean=self.status.fatal is None)
        self.scanner.set_slide_listener(None)
        self.scanner.close()
        self.outbox.close()
        log.info("appliance stopped")
