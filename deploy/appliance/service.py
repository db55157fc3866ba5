"""The appliance daemon: start-up steps, workers under a supervisor, status, shutdown.

Start-up is a list of short steps (state dir, outbox, broker, MQTT, scanner = bridge + camera +
engine warm-up, workers); each is logged and reported to systemd as ``STATUS=``, and ``READY=1``
follows the last one.  Two workers run under the :class:`Supervisor`: the scan worker (one slide
at a time from the bounded :class:`ScanQueue`) and the :class:`OutboxPump`.  The main thread
watches them, pets the systemd watchdog, refreshes the health file, republishes the retained
status when it changes and publishes metrics.

Model updates (``cmd/ota``, :mod:`deploy.appliance.ota`): the "model store" step recovers an
interrupted install before the scanner loads the store's active model; a third worker, the OTA
worker, receives and installs bundles.  The scan worker holds :attr:`Appliance.slide_lock`
while a slide is in progress and the switch takes it, so a slide never spans two models.

Shutdown (SIGTERM/SIGINT -> :meth:`Appliance.request_stop`): no new scans are accepted and
waiting ones are dropped (they have no result yet; their requesters see no result); the running
slide may *finish* within ``scan.shutdown_grace_s`` and its result is committed to the outbox;
past that it is *abandoned* (cancelled between fields, no result, nothing half-written).  Then
``stopped`` is published (retained) and the process exits 0.  Results not yet acknowledged stay
in the outbox and are delivered after the next start.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from paho.mqtt.properties import Properties

from deploy import __version__
from deploy.appliance.base import ScannerInfo, ScanRequest, SlideScanner
from deploy.appliance.commands import CommandFailed, CommandRouter
from deploy.appliance.health import write_health
from deploy.appliance.notify import sd_notify, watchdog_interval_s
from deploy.appliance.ota import (
    ModelSwapper,
    OtaController,
    OtaPorts,
    OtaSettings,
    chunk_filter,
)
from deploy.appliance.queue import ScanQueue
from deploy.appliance.results import Identity, build_result, rfc3339
from deploy.appliance.status import Snapshot, StatusTracker
from deploy.appliance.supervisor import Supervisor
from deploy.broker import BrokerAddress, EmbeddedBroker, parse_broker_url
from deploy.config import AppConfig
from deploy.exceptions import (
    DeployError,
    OutboxFullError,
    ScanCancelledError,
    ScanRejectedError,
    SchemaError,
    ServiceError,
)
from deploy.mqtt import MqttLink, OutboxPump, Topics
from deploy.ota.watch import StoreWatcher
from deploy.outbox import Outbox
from deploy.requests import reply_topics
from deploy.schemas import validate
from firmware_bridge.exceptions import BridgeError
from inference.exceptions import InferenceError, SpectrumInputError

log = logging.getLogger(__name__)

OUTBOX_FILE = "outbox.sqlite"
LOOP_PERIOD_S = 0.25
ABANDON_WAIT_S = 10.0
SETTLE_INFLIGHT_S = 2.0
MAX_FAILURES = 10000  # failed-scan reasons kept (like ``committed``): the daemon runs for months
SCAN_ERRORS = (DeployError, BridgeError, InferenceError)
# Failed slides that say nothing about the model (microscope, QC): they do not fail an update.
NOT_THE_MODEL = (BridgeError, SpectrumInputError)


@dataclass(frozen=True)
class CommittedResult:
    """A result that is safely in the outbox."""

    message_id: str
    scan_id: str
    slide_id: str
    seq: int
    label: str | None


@dataclass
class Counters:
    """Counters published as metrics."""

    scans_ok: int = 0
    scans_failed: int = 0
    scans_cancelled: int = 0
    scans_rejected: int = 0
    scan_ms: deque[float] = field(default_factory=lambda: deque(maxlen=100))


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
        self.outbox = Outbox(
            state_dir / OUTBOX_FILE,
            config.outbox.max_rows,
            config.outbox.max_bytes,
            config.outbox.synchronous,
        )
        self.router = CommandRouter(
            config.device.id, config.mqtt.max_command_bytes, self._send_reply
        )
        self.supervisor = Supervisor(config.service.restart_max, config.service.restart_window_s)
        self.counters = Counters()
        self.committed: deque[CommittedResult] = deque(maxlen=10000)
        self.failures: dict[str, str] = {}  # scan id -> why it produced no result
        self.broker: EmbeddedBroker | None = None
        self.link: MqttLink | None = None
        self.pump: OutboxPump | None = None
        self._seq = 0
        self._lock = threading.Lock()
        self._stop_requested = threading.Event()
        self._last_status: str | None = None
        self._closed = False
        self._address: BrokerAddress | None = None
        self.slide_lock = threading.Lock()  # held while a slide is in progress
        self.ota = OtaController(
            state_dir,
            self._ota_ports(),
            scanner if isinstance(scanner, ModelSwapper) else None,
            ota if ota is not None else OtaSettings.from_config(config.ota),
        )
        self._register_commands()

    def _ota_ports(self) -> OtaPorts:
        return OtaPorts(
            slide_lock=lambda: self.slide_lock,
            publish=self._publish_retained,
            send_reply=lambda payload, corr, to: self._publish_reply("ota", payload, corr, to),
            set_updating=self._set_updating,
            model_loaded=self._model_loaded,
            connected=lambda: bool(self.link and self.link.connected.is_set()),
            base_topic=self.topics.base,
            prefix=self.topics.prefix,
            device_id=self.topics.device_id,
        )

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
        # Inline OTA chunks arrive outside cmd/+; subscribe to them only when OTA can run.
        extra = [chunk_filter(self.topics.base)] if self.ota.enabled else []
        self.link = MqttLink(
            self.config.mqtt,
            self._broker_address(),
            self.topics,
            on_command=self._on_command,
            on_online=self._on_online,
            extra_filters=extra,
        )
        self.pump = OutboxPump(self.outbox, self.link, self.config.mqtt.max_inflight)
        self.link.on_puback = self.pump.on_puback
        self.link.start()

    def _broker_address(self) -> BrokerAddress:
        if self._address is None:
            raise ServiceError("MQTT started before the broker step")
        return self._address

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
        pump = self.pump
        if pump is None:
            raise ServiceError("workers started before MQTT")
        self.supervisor.add("scan", self._scan_loop)
        self.supervisor.add("publish", pump.run)
        if self.ota.enabled:
            self.supervisor.add("ota", self.ota.run)
        # ota/state follows the store whoever changes it (e.g. a local omis ota install).
        self.supervisor.add("store-watch", StoreWatcher(self.ota.store, self.ota.publish_state).run)
        self.supervisor.start()

    # ----------------------------------------------------------------- scanning

    def submit(self, request: ScanRequest) -> int:
        """Queue a scan; returns its queue position.  Raises ScanRejectedError."""
        try:
            if self._stop_requested.is_set():
                raise ScanRejectedError("the appliance is stopping", "stopping")
            if not self.outbox.has_room():
                self.publish_status()
                raise ScanRejectedError(
                    "outbox full: results are waiting for the broker", "outbox_full"
                )
            position = self.queue.put(request)
        except ScanRejectedError:
            self.counters.scans_rejected += 1
            raise
        log.info(
            "scan %s of slide %s queued (%s)", request.scan_id, request.slide_id, request.source
        )
        return position

    def _scan_loop(self, stop: threading.Event) -> None:
        while not stop.is_set():
            request = self.queue.get(timeout_s=0.5)
            if request is None:
                continue
            try:
                self.publish_status()
                self._scan_one(request)
            finally:
                self.queue.done()
                self.publish_status()

    def _scan_one(self, request: ScanRequest) -> None:
        with self.slide_lock:  # a model switch waits for the end of this slide
            started = rfc3339()  # after the lock: the slide starts on the model serving now
            t0 = time.monotonic()
            health = self.ota.slide_started()
            try:
                body = self.scanner.scan(request, self.queue.cancel_event)
            except ScanCancelledError as exc:
                self.counters.scans_cancelled += 1
                self._note_failure(request.scan_id, f"cancelled: {exc}")
                log.warning("scan %s cancelled: %s", request.scan_id, exc)
                return
            except SCAN_ERRORS as exc:
                self.counters.scans_failed += 1
                self._note_failure(request.scan_id, str(exc))
                self.status.record_error("scan_failed", f"slide {request.slide_id}: {exc}")
                log.error("scan %s of slide %s failed: %s", request.scan_id, request.slide_id, exc)
                if not isinstance(exc, NOT_THE_MODEL):
                    self.ota.slide_finished(health, False, f"slide {request.slide_id}: {exc}")
                return
        self.ota.slide_finished(health, True)
        self._note_model(body.get("model"))
        self.counters.scan_ms.append((time.monotonic() - t0) * 1000.0)
        with self._lock:
            self._seq += 1
            seq = self._seq
        result = build_result(
            self.identity,
            seq=seq,
            request=request,
            started_at=started,
            finished_at=rfc3339(),
            body=body,
        )
        self._commit(result)
        self.counters.scans_ok += 1

    def _note_failure(self, scan_id: str, reason: str) -> None:
        self.failures[scan_id] = reason
        while len(self.failures) > MAX_FAILURES:  # dicts keep insertion order: drop the oldest
            del self.failures[next(iter(self.failures))]

    def _commit(self, result: dict[str, Any]) -> None:
        try:
            validate("result", result)
        except SchemaError as exc:
            # Keep it anyway: a result the dashboard may reject beats a lost slide.
            self.status.record_error("result_invalid", str(exc))
            log.error("result %s does not match its schema: %s", result["message_id"], exc)
        payload = json.dumps(result, separators=(",", ":"), allow_nan=False).encode("utf-8")
        while True:
            try:
                self.outbox.put(result["message_id"], self.topics.result, payload)
                break
            except OutboxFullError as exc:
                # Admission control makes this rare; wait for room, never drop.
                self.status.record_error("outbox_full", str(exc))
                self.publish_status()
                time.sleep(1.0)
        label = (result.get("prediction") or {}).get("label")
        self.committed.append(
            CommittedResult(
                result["message_id"], result["scan_id"], result["slide_id"], result["seq"], label
            )
        )
        log.info(
            "result %s (slide %s, seq %d) committed",
            result["message_id"],
            result["slide_id"],
            result["seq"],
        )
        if self.pump is not None:
            self.pump.notify()

    def _on_slide_inserted(self, slide_id: str) -> None:
        request = ScanRequest(slide_id, self.config.scan.fields, self.config.scan.plan, "firmware")
        try:
            self.submit(request)
        except ScanRejectedError as exc:
            self.status.record_error(exc.code, f"slide {slide_id} inserted: {exc}")
            log.error("slide %s inserted but not scanned: %s", slide_id, exc)

    # ----------------------------------------------------------------- commands

    def _register_commands(self) -> None:
        self.router.register("scan", "cmd_scan", self._cmd_scan)
        self.router.register("cancel", "cmd_cancel", self._cmd_cancel)
        self.router.register("status", "cmd_status", self._cmd_status)
        self.router.register("ota", "cmd_ota", self.ota.handle_offer)

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
            verb,
            payload,
            correlation if isinstance(correlation, bytes) else None,
            response_topic,
        )

    def _send_reply(
        self, verb: str, payload: bytes, correlation: bytes | None, response_topic: str | None
    ) -> None:
        # An accepted offer is answered once its bundle has arrived (see deploy.appliance.ota).
        if verb == "ota" and self.ota.defer_reply(payload, correlation, response_topic):
            return
        self._publish_reply(verb, payload, correlation, response_topic)

    def _publish_reply(
        self,
        verb: str,
        payload: bytes,
        correlation: bytes | None,
        response_topic: str | None = None,
    ) -> None:
        if self.link is None:
            return
        props = self.link.reply_properties(correlation)
        # The documented reply topic always gets it; an allowed response topic gets a copy.
        topics, refused = reply_topics(
            self.topics.reply(verb), response_topic, self.topics.prefix, self.topics.device_id
        )
        if refused:
            log.warning("cmd/%s: %s", verb, refused)
        for topic in topics:
            self.link.publish(topic, payload, qos=1, properties=props)

    # ----------------------------------------------------------------- status and metrics

    def snapshot(self) -> Snapshot:
        """The current queue and outbox state."""
        return Snapshot(
            self.queue.current, self.queue.depth, self.queue.capacity, self.outbox.stats()
        )

    def publish_status(self, force: bool = False) -> dict[str, Any]:
        """Publish the retained status if it changed (or ``force``); returns it."""
        payload = self.status.payload(self.snapshot())
        key = json.dumps(
            {k: v for k, v in payload.items() if k != "at"}, sort_keys=True, allow_nan=False
        )
        with self._lock:
            changed = force or key != self._last_status
            self._last_status = key
        if changed and self.link is not None:
            self.link.publish(
                self.topics.status, json.dumps(payload, allow_nan=False), qos=1, retain=True
            )
            sd_notify(f"STATUS={payload['state']}")
        return payload

    def _publish_retained(self, topic: str, payload: bytes, retain: bool) -> None:
        if self.link is not None:
            self.link.publish(topic, payload, qos=1, retain=retain)

    def _set_updating(self, updating: bool) -> None:
        self.status.updating = updating
        self.publish_status()

    def _model_loaded(self, info: ScannerInfo) -> None:
        self.status.info = info
        self.publish_status(force=True)

    def _note_model(self, model: Any) -> None:
        # The scanner may have followed a switch made by another process (omis ota rollback).
        info = self.status.info
        if info is not None and isinstance(model, dict) and model != info.model:
            self.status.info = ScannerInfo(model, info.engine, info.firmware)

    def _on_online(self) -> None:
        # Retained state is lost when the broker restarts: republish on every connect.
        self.publish_status(force=True)
        self.ota.publish_state()
        if self.pump is not None:
            self.pump.reconnected()

    def metrics(self) -> dict[str, Any]:
        """The ``omis.metrics/1`` document."""
        c = self.counters
        pump = self.pump
        scan_ms = list(c.scan_ms)
        counters = {
            "scans_ok": c.scans_ok,
            "scans_failed": c.scans_failed,
            "scans_cancelled": c.scans_cancelled,
            "scans_rejected": c.scans_rejected,
            "results_published": pump.published if pump else 0,
            "results_acked": pump.acked if pump else 0,
            "results_rejected": pump.rejected if pump else 0,
            "mqtt_connects": self.link.connects if self.link else 0,
            "worker_restarts": len(self.supervisor.restarts),
        }
        counters.update({f"commands_{k}": v for k, v in self.router.counts.items()})
        stats = self.outbox.stats()
        return {
            "schema": "omis.metrics/1",
            "device_id": self.identity.device_id,
            "boot_id": self.identity.boot_id,
            "at": rfc3339(),
            "counters": counters,
            "latency_ms": {
                "scan_last": scan_ms[-1] if scan_ms else None,
                "scan_mean": sum(scan_ms) / len(scan_ms) if scan_ms else None,
            },
            "outbox": {"rows": stats.rows, "bytes": stats.bytes, "full": stats.full},
        }

    def _write_health(self) -> None:
        snap = self.snapshot()
        state, _ = self.status.state(snap)
        write_health(
            self.state_dir,
            {
                "state": state,
                "device_id": self.identity.device_id,
                "boot_id": self.identity.boot_id,
                "connected": bool(self.link and self.link.connected.is_set()),
                "outbox_rows": snap.outbox.rows,
                "dead_workers": self.supervisor.dead(),
                "last_error": self.status.last_error,
            },
        )

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
                self._write_health()
                raise
            if watchdog is not None and now >= next_dog:
                sd_notify("WATCHDOG=1")
                next_dog = now + watchdog
            if now >= next_health:
                self._write_health()
                next_health = now + svc.health_interval_s
            if now >= next_metrics and self.link is not None:
                self.link.publish(
                    self.topics.metrics, json.dumps(self.metrics(), allow_nan=False), qos=0
                )
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

    def _finish_current_scan(self) -> None:
        dropped = self.queue.close()
        for request in dropped:
            log.warning(
                "stopping: queued scan %s of slide %s dropped", request.scan_id, request.slide_id
            )
        grace = self.config.scan.shutdown_grace_s
        if self.queue.wait_idle(grace):
            return
        abandoned = self.queue.cancel()
        log.warning("stopping: slide scan %s abandoned after %.0f s grace", abandoned, grace)
        self.queue.wait_idle(ABANDON_WAIT_S)

    def _settle_inflight(self) -> None:
        pump, link = self.pump, self.link
        if pump is None or link is None or not link.connected.is_set():
            return
        deadline = time.monotonic() + SETTLE_INFLIGHT_S
        while pump.inflight and time.monotonic() < deadline:
            time.sleep(0.05)

    def shutdown(self) -> None:
        """Finish or abandon the current slide, stop workers, publish ``stopped`` (idempotent)."""
        if self._closed:
            return
        self._closed = True
        self._stop_requested.set()
        sd_notify("STOPPING=1")
        self._finish_current_scan()
        self.ota.stop()
        self._settle_inflight()
        self.supervisor.stop()
        if self.link is not None:
            if self.status.fatal is None:
                self.publish_status()
            # an exit in error is not a clean stop: say offline, as the last will would
            self.link.close(availability="stopped" if self.status.fatal is None else "offline")
        self.scanner.set_slide_listener(None)
        self.scanner.close()
        self.outbox.close()
        if self.broker is not None:
            self.broker.close()
        log.info("appliance stopped")
