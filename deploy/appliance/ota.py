"""The daemon side of over-the-air model updates: ``cmd/ota`` -> receive -> install -> report.

Threads and what each does:

* MQTT network thread: :meth:`OtaController.handle_offer` validates the offer (schema, trusted
  signature, anti-rollback, ``min_app_version``; cheap, no download) and queues it;
  :meth:`OtaController.on_chunk` queues inline chunks.  Nothing slow runs here.
* OTA worker (supervised, :meth:`OtaController.run`): receives the bundle (path, HTTPS, or
  inline chunks kept on disk and re-requested on ``ota/need/<transfer>``), then runs the
  :class:`~deploy.ota.install.Installer`: verify -> stage -> golden gate (the scanner loads the
  new model *beside* the serving one) -> switch under the slide lock (never inside a slide) ->
  health period -> commit or automatic rollback.
* Scan worker: holds the slide lock for each slide and reports each slide's outcome through
  :meth:`slide_started` / :meth:`slide_finished`; only slides that *started* on the new model
  count towards its health period.

The ``cmd/ota`` reply (exactly one, with the offer's ``correlation_id``) is sent once the bundle
has been received and matches the offer (``ok: true``, ``result.received``), or at once with the
reason when the offer or the transfer is refused.  Progress and the outcome go to the retained
``ota/state`` (``omis.ota_state/1`` with ``progress``), republished on every reconnect.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from deploy import __version__
from deploy.appliance.base import ScannerInfo
from deploy.appliance.commands import CommandFailed
from deploy.appliance.results import rfc3339
from deploy.config import OtaConfig
from deploy.exceptions import SchemaError
from deploy.ota.delivery import (
    ChunkAssembler,
    InlineSource,
    OtaOffer,
    PathSource,
    UrlSource,
    check_matches_offer,
    fetch_url,
    need_topic,
    ota_state_payload,
    parse_chunk_topic,
    parse_offer,
    precheck_offer,
)
from deploy.ota.exceptions import (
    DeliveryError,
    HealthCheckError,
    OtaError,
    RejectedError,
    StoreError,
)
from deploy.ota.install import HealthMonitor, HealthPolicy, Installer, InstallOptions, ServiceHooks
from deploy.ota.store import ModelStore, Outcome
from deploy.ota.trust import TrustStore
from deploy.schemas import validate
from inference.bundle import Bundle
from inference.exceptions import InferenceError

log = logging.getLogger(__name__)

OTA_DIR = "ota"
CHUNK_QUEUE = 64  # chunks waiting for the worker; beyond this they are dropped and re-requested
MAX_CORRUPT = 2  # whole-transfer sha256 failures tolerated before the offer is refused
POLL_S = 0.2
OTA_ERRORS = (OtaError, InferenceError, OSError)


@dataclass(frozen=True)
class OtaSettings:
    """Knobs of the daemon's OTA path (defaults as ``docs/ota.md`` suggests; the service takes
    them from the ``ota:`` configuration section unless given explicitly)."""

    health: HealthPolicy = field(
        default_factory=lambda: HealthPolicy(slides=3, seconds=600.0, check_interval_s=30.0)
    )
    need_after_s: float = 5.0  # no chunk for this long while some are missing: ask again
    transfer_timeout_s: float = 300.0  # no chunk for this long: the offer is refused
    fetch_timeout_s: float = 60.0  # HTTPS download socket timeout
    checks: Sequence[Callable[[], None]] = ()  # extra application health checks; raise to fail

    @classmethod
    def from_config(cls, config: OtaConfig) -> OtaSettings:
        """The settings of the configuration file's ``ota:`` section."""
        return cls(
            health=HealthPolicy(
                slides=config.health_slides,
                seconds=config.health_seconds,
                check_interval_s=config.health_check_interval_s,
            ),
            need_after_s=config.need_after_s,
            transfer_timeout_s=config.transfer_timeout_s,
            fetch_timeout_s=config.fetch_timeout_s,
        )


@runtime_checkable
class ModelSwapper(Protocol):
    """A scanner that can load a model beside the serving one and switch between slides."""

    @property
    def follows_store(self) -> bool:
        """True when it serves the model store's active model (no pinned bundle)."""
        ...

    def prepare_model(self, bundle: Bundle) -> None:
        """Load and golden-gate ``bundle`` beside the serving model; raise to refuse it."""
        ...

    def discard_prepared(self) -> None:
        """Drop a prepared model (idempotent)."""
        ...

    def load_model(self, bundle: Bundle, generation: int | None) -> ScannerInfo:
        """Serve ``bundle`` from the next slide on (slide lock held); raise to refuse it."""
        ...


@dataclass(frozen=True)
class OtaPorts:
    """What the service lends the controller."""

    slide_lock: Callable[[], AbstractContextManager[object]]
    publish: Callable[[str, bytes, bool], None]  # (topic, payload, retain); QoS 1
    send_reply: Callable[[bytes, bytes | None, str | None], None]  # (reply, correlation, to)
    set_updating: Callable[[bool], None]
    model_loaded: Callable[[ScannerInfo], None]
    connected: Callable[[], bool]
    base_topic: str  # <prefix>/<device>
    prefix: str
    device_id: str


@dataclass
class _Job:
    offer: OtaOffer
    name: str
    version: int


@dataclass
class _HeldReply:
    """The acceptance reply of the running job until the bundle is received."""

    cid: str
    reply: dict[str, Any] | None = None
    correlation: bytes | None = None
    response_topic: str | None = None  # MQTT 5 Response Topic of the offer
    verdict: tuple[bool, dict[str, Any]] | None = None


OFFER_SCHEMA_ID = "https://omis.example/schemas/omis.ota_offer/1"


def offer_json_schema() -> dict[str, Any]:
    """``deploy/schemas/cmd_ota.json``: the JSON Schema of :class:`OtaOffer` (draft 2020-12).

    Generated from the pydantic model, with ``kind`` required in every source (pydantic's
    discriminated union needs it) and the OpenAPI-only ``discriminator`` keyword left out.
    """
    schema = OtaOffer.model_json_schema(by_alias=True)
    for name in ("PathSource", "UrlSource", "InlineSource"):
        definition = schema["$defs"][name]
        definition["required"] = ["kind", *definition.get("required", [])]
    schema["properties"]["source"].pop("discriminator", None)
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": OFFER_SCHEMA_ID,
        "title": "cmd/ota - omis.ota_offer/1, a signed model offer (deploy.ota.delivery.OtaOffer)",
        **{k: v for k, v in schema.items() if k != "title"},
    }


def chunk_filter(base_topic: str) -> str:
    """Subscription for the inline chunks of one device."""
    return f"{base_topic}/ota/chunk/#"


class OtaController:
    """Offers, transfers, installs and ``ota/state`` of one appliance (no I/O before open())."""

    def __init__(
        self,
        state_dir: Path,
        ports: OtaPorts,
        swapper: ModelSwapper | None,
        settings: OtaSettings | None = None,
    ) -> None:
        self.state_dir = state_dir
        self.ports = ports
        self.swapper = swapper
        self.settings = settings or OtaSettings()
        self.store = ModelStore(state_dir)
        self.trust = TrustStore(state_dir)
        self.work_dir = state_dir / OTA_DIR
        self.monitor = HealthMonitor()
        self._lock = threading.Lock()
        self._jobs: queue.Queue[_Job] = queue.Queue()
        self._chunks: queue.Queue[tuple[str, bytes]] = queue.Queue(CHUNK_QUEUE)
        self._job: _Job | None = None
        self._transfer: str | None = None
        self._held: _HeldReply | None = None
        self._progress: dict[str, Any] | None = None
        self._phase = ""
        self._watch = 0  # id of the health period in progress (0: none)
        self._stopping = threading.Event()

    @property
    def enabled(self) -> bool:
        """True when this service can take updates (its scanner follows the model store)."""
        return self.unavailable_reason() is None

    def unavailable_reason(self) -> str | None:
        """Why ``cmd/ota`` is refused, or None."""
        if self.swapper is None:
            return "this scanner cannot switch models"
        if not self.swapper.follows_store:
            return "the model is pinned by --bundle (scan.bundle); OTA needs the model store"
        return None

    # -- start-up --------------------------------------------------------------------------------

    def open(self) -> str | None:
        """Finish or undo an install a restart interrupted (before the scanner loads a model)."""
        try:
            action = self.store.recover()
        except StoreError as exc:
            log.warning("ota: model store not recovered: %s", exc)
            return None
        if action is not None:
            log.warning("ota: recovered the model store at start-up: %s", action)
        return action

    # -- network thread --------------------------------------------------------------------------

    def handle_offer(self, request: dict[str, Any]) -> dict[str, Any]:
        """``cmd/ota`` handler: precheck and queue the offer; raises :class:`CommandFailed`."""
        reason = self.unavailable_reason()
        if reason is not None:
            raise CommandFailed("unavailable", f"OTA unavailable: {reason}")
        try:
            offer = parse_offer(json.dumps(request, allow_nan=False).encode("utf-8"))
        except DeliveryError as exc:
            raise CommandFailed("invalid", str(exc)) from exc
        with self._lock:
            if self._job is not None:
                raise CommandFailed("busy", f"v{self._job.version} is being installed; offer later")
            try:
                manifest = precheck_offer(offer, self.trust, self.store, __version__)
            except (RejectedError, DeliveryError) as exc:
                log.warning("ota: offer %s rejected: %s", offer.correlation_id, exc)
                raise CommandFailed("rejected", str(exc)) from exc
            job = _Job(offer, manifest.name, manifest.version)
            self._job = job
            self._held = _HeldReply(offer.correlation_id)
            source = offer.source
            self._transfer = source.transfer_id if isinstance(source, InlineSource) else None
            self._jobs.put(job)
        self.ports.set_updating(True)
        self._set_progress("offered", job)
        return {
            "accepted": True,
            "name": job.name,
            "version": job.version,
            "source": source.kind,
            "state_topic": f"{self.ports.base_topic}/ota/state",
        }

    def defer_reply(
        self, payload: bytes, correlation: bytes | None, response_topic: str | None = None
    ) -> bool:
        """Hold the acceptance reply of the running job until its bundle is received.

        Returns True when the reply was taken (held, or sent patched with the verdict).
        """
        with self._lock:
            held = self._held
            if held is None or held.reply is not None:
                return False
            reply = json.loads(payload)
            if not reply.get("ok") or reply.get("correlation_id") != held.cid:
                return False
            held.reply, held.correlation = reply, correlation
            held.response_topic = response_topic
            if held.verdict is None:
                return True
            self._held = None
        self._send_verdict(held)
        return True

    def on_chunk(self, topic: str, payload: bytes) -> None:
        """An inline chunk arrived: hand it to the worker (dropped when not expected)."""
        try:
            transfer, _ = parse_chunk_topic(topic)
        except DeliveryError:
            log.debug("ota: ignoring %s", topic)
            return
        if transfer != self._transfer:
            log.debug("ota: chunk of transfer %s, which is not running", transfer)
            return
        try:
            self._chunks.put_nowait((topic, payload))
        except queue.Full:
            log.warning("ota: chunk queue full; %s dropped (it will be asked for again)", topic)

    # -- scan worker -----------------------------------------------------------------------------

    def slide_started(self) -> int:
        """Called with the slide lock held: the health period this slide belongs to (0: none)."""
        return self._watch

    def slide_finished(self, token: int, ok: bool, reason: str = "") -> None:
        """Feed the health period with a slide that started on the new model."""
        if token and token == self._watch:
            self.monitor.record_slide(ok, reason)

    # -- OTA worker ------------------------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        """Worker loop: one job at a time until ``stop`` is set."""
        while not stop.is_set():
            try:
                job = self._jobs.get(timeout=0.5)
            except queue.Empty:
                continue
            try:
                self._run_job(job, stop)
            finally:
                self._finish_job()

    def _run_job(self, job: _Job, stop: threading.Event) -> None:
        try:
            archive = self._receive(job, stop)
        except OTA_ERRORS as exc:
            log.warning("ota: %s v%d not received: %s", job.name, job.version, exc)
            self._release_reply(False, {"code": "rejected", "message": f"not received: {exc}"})
            self._record(Outcome(result="rejected", version=job.version, reason=str(exc)))
            return
        self._release_reply(True, {"received": True})
        try:
            self._install(job, archive)
        finally:
            if archive.parent == self.work_dir:
                archive.unlink(missing_ok=True)

    def _install(self, job: _Job, archive: Path) -> None:
        swapper = self.swapper
        if swapper is None:
            raise StoreError("no scanner to switch")  # enabled() makes this unreachable
        hooks = ServiceHooks(
            between_slides=self.ports.slide_lock,
            load=self._load,
            checks=self._checks(),
            monitor=self.monitor,
        )
        installer = Installer(self.store, self.trust, swapper.prepare_model, hooks, self._on_step)
        try:
            result = installer.install(archive, InstallOptions(health=self.settings.health))
            log.info("ota: %s v%d committed", job.name, job.version)
            self._set_progress("committed", job, generation=result.generation)
        except HealthCheckError as exc:
            log.warning("ota: %s", exc)
        except OTA_ERRORS as exc:
            log.warning("ota: %s v%d not installed: %s", job.name, job.version, exc)
        finally:
            swapper.discard_prepared()
            self._watch = 0

    def _finish_job(self) -> None:
        with self._lock:
            self._job = None
            self._transfer = None
            self._held = None
        _drain(self._chunks)
        self._progress = None
        self.ports.set_updating(False)
        self.publish_state()

    # -- receiving ---------------------------------------------------------------------------------

    def _receive(self, job: _Job, stop: threading.Event) -> Path:
        source = job.offer.source
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self._set_progress("receiving", job, source=source.kind)
        if isinstance(source, PathSource):
            out = Path(source.path)
        elif isinstance(source, UrlSource):
            out = self.work_dir / f"{job.offer.correlation_id}.tar"
            fetch_url(source, out, self.settings.fetch_timeout_s)
        else:
            out = self._receive_inline(job, source, stop)
        check_matches_offer(out, job.offer)
        self._set_progress("received", job)
        return out

    def _receive_inline(self, job: _Job, source: InlineSource, stop: threading.Event) -> Path:
        # ChunkAssembler keeps each chunk on disk, so a re-sent offer of the same transfer
        # resumes; a bad chunk is dropped and asked for again, never fatal.
        asm = ChunkAssembler(self.work_dir / "chunks", source)
        out = self.work_dir / f"{job.offer.correlation_id}.tar"
        need = need_topic(self.ports.prefix, self.ports.device_id, source.transfer_id)
        corrupt = 0
        last_chunk = last_need = time.monotonic()
        while True:
            if stop.is_set() or self._stopping.is_set():
                raise DeliveryError("the appliance is stopping")
            try:
                topic, payload = self._chunks.get(timeout=POLL_S)
            except queue.Empty:
                idle = time.monotonic() - last_chunk
                if idle > self.settings.transfer_timeout_s:
                    raise DeliveryError(
                        f"transfer incomplete: {len(asm.missing())} chunk(s) missing after "
                        f"{idle:.0f} s without data"
                    ) from None
                if time.monotonic() - last_need > self.settings.need_after_s:
                    self.ports.publish(need, asm.need_payload(), False)
                    last_need = time.monotonic()
                continue
            last_chunk = time.monotonic()
            _, index = parse_chunk_topic(topic)
            try:
                asm.add(index, payload)
            except DeliveryError as exc:
                log.warning("ota: %s", exc)
                continue
            missing = asm.missing()
            if missing and index == source.chunks - 1:
                self.ports.publish(need, asm.need_payload(), False)  # the tail came, gaps remain
                last_need = time.monotonic()
            if missing:
                continue
            try:
                return asm.assemble(out)
            except DeliveryError:
                corrupt += 1
                if corrupt >= MAX_CORRUPT:
                    raise
                self.ports.publish(need, asm.need_payload(), False)  # every chunk again

    # -- installer hooks ---------------------------------------------------------------------------

    def _on_step(self, step: str, detail: dict[str, Any]) -> None:
        self._phase = step
        job = self._job
        if job is not None:
            self._set_progress(step, job, **detail)

    def _load(self, bundle: Bundle) -> None:
        """ServiceHooks.load: runs with the slide lock held (switch and rollback)."""
        swapper = self.swapper
        if swapper is None:
            raise StoreError("no scanner to switch")
        info = swapper.load_model(bundle, self.store.generation())
        if self._phase == "switched":
            self._watch += 1  # slides from now on run on the new model and count for it
        else:
            self._watch = 0
        self.ports.model_loaded(info)

    def _checks(self) -> list[Callable[[], None]]:
        def broker_reachable() -> None:
            if not self.ports.connected():
                raise HealthCheckError("broker unreachable")

        def not_stopping() -> None:
            if self._stopping.is_set():
                raise HealthCheckError("the appliance is stopping")

        return [not_stopping, broker_reachable, *map(_wrapped, self.settings.checks)]

    # -- replies, state ----------------------------------------------------------------------------

    def _release_reply(self, ok: bool, detail: dict[str, Any]) -> None:
        with self._lock:
            held = self._held
            if held is None:
                return
            held.verdict = (ok, detail)
            if held.reply is None:
                return  # the router has not sent it yet: defer_reply sends it
            self._held = None
        self._send_verdict(held)

    def _send_verdict(self, held: _HeldReply) -> None:
        reply, verdict = held.reply, held.verdict
        if reply is None or verdict is None:
            return
        ok, detail = verdict
        reply = dict(reply, at=rfc3339(), ok=ok)
        if ok:
            reply["result"] = {**reply.get("result", {}), **detail}
        else:
            reply.pop("result", None)
            reply["error"] = {"code": detail["code"], "message": str(detail["message"])[:500]}
        body = json.dumps(reply, allow_nan=False).encode("utf-8")
        self.ports.send_reply(body, held.correlation, held.response_topic)

    def _record(self, outcome: Outcome) -> None:
        try:
            self.store.record_outcome(outcome)
        except StoreError as exc:
            log.warning("ota: outcome not recorded: %s", exc)

    def _set_progress(self, step: str, job: _Job, **detail: Any) -> None:
        self._progress = {
            "step": step,
            "correlation_id": job.offer.correlation_id,
            "name": job.name,
            "version": job.version,
            **detail,
        }
        self.publish_state()

    def state(self) -> dict[str, Any]:
        """The ``ota/state`` payload now."""
        return ota_state_payload(self.store, self._progress)

    def publish_state(self) -> None:
        """Publish the retained ``ota/state`` (also on every reconnect)."""
        try:
            payload = self.state()
        except StoreError as exc:
            log.error("ota: state unreadable: %s", exc)
            return
        try:
            validate("ota_state", payload)
        except SchemaError as exc:
            log.error("ota: ota/state does not match its schema: %s", exc)
        body = json.dumps(payload, separators=(",", ":"), allow_nan=False).encode("utf-8")
        self.ports.publish(f"{self.ports.base_topic}/ota/state", body, True)

    def stop(self) -> None:
        """Shutting down: a transfer is abandoned and a health period fails (rolled back)."""
        self._stopping.set()
        if self._watch:
            self.monitor.record_check(False, "the appliance is stopping")


def _wrapped(check: Callable[[], None]) -> Callable[[], None]:
    """An injected check whose every error counts as a failed health check."""

    def run() -> None:
        try:
            check()
        except OTA_ERRORS:
            raise
        except Exception as exc:
            raise HealthCheckError(f"{getattr(check, '__name__', 'check')}: {exc}") from exc

    return run


def _drain(q: queue.Queue[Any]) -> None:
    while True:
        try:
            q.get_nowait()
        except queue.Empty:
            return
