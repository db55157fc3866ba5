"""The daemon side of over-the-air model updates: ``cmd/ota`` -> receive -> install -> report.

Threads and what each does:

* MQTT network thread: :meth:`OtaController.handle_offer` takes the typed offer (the command
  router parsed it), checks it (trusted signature, anti-rollback, ``min_app_version``; cheap, no
  download) and queues it; :meth:`OtaController.on_chunk` queues inline chunks.  Nothing slow
  runs here.
* OTA worker (supervised, :meth:`OtaController.run`): receives the bundle
  (:class:`~deploy.appliance.ota_transfer.OtaReceiver`: path, HTTPS, or inline chunks kept on
  disk and re-requested on ``ota/need/<transfer>``), then runs the
  :class:`~deploy.ota.install.Installer` with the offer's manifest, verified and parsed once
  when the offer came: one verified unpack (bytes compared with the offer's) -> golden gate
  (the scanner loads the new model *beside* the serving one) -> switch under the slide lock
  (never inside a slide) -> health period -> commit or automatic rollback.
* Scan worker: holds the slide lock for each slide and reports each slide's outcome through
  :meth:`slide_started` / :meth:`slide_finished`; only slides that *started* on the new model
  count towards its health period.

The ``cmd/ota`` reply (exactly one, with the offer's ``correlation_id``) is sent once the bundle
has been received and matches the offer (``ok: true``, ``result.received``), or at once with the
reason when the offer or the transfer is refused: :meth:`handle_offer` returns a future of the
reply's result and the command router answers when it resolves.  Progress and the outcome go
to the retained ``ota/state`` (``omis.ota_state/1`` with ``progress``), republished on every
reconnect.
"""

from __future__ import annotations

import logging
import queue
import threading
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deploy import __version__
from deploy.appliance.base import ModelSwapper, ShadowHost, SlideVerdict
from deploy.appliance.commands import CommandFailed
from deploy.appliance.health import HealthJudge, ValidatedRates
from deploy.appliance.ota_settings import OtaPorts, OtaSettings, ota_health_checks
from deploy.appliance.ota_transfer import (
    OtaReceiver,
    TransferSettings,
    chunk_filter,
    offer_json_schema,
)
from deploy.exceptions import SchemaError
from deploy.ota.delivery import OtaOffer, PathSource, ota_state_payload, precheck_offer
from deploy.ota.exceptions import (
    DeliveryError,
    HealthCheckError,
    OtaError,
    RejectedError,
    StoreError,
)
from deploy.ota.install import (
    HealthMonitor,
    Installer,
    InstallOptions,
    ServiceHooks,
    check_candidate,
)
from deploy.ota.shadow import ShadowStore, install_shadow
from deploy.ota.signing import SignedManifest, read_pair, verify_manifest
from deploy.ota.store import ModelStore, Outcome
from deploy.ota.trust import TrustStore
from deploy.schemas import validate
from inference.bundle import Bundle
from inference.exceptions import InferenceError
from inference.result import strict_json

log = logging.getLogger(__name__)

__all__ = [
    "ModelSwapper",
    "OtaController",
    "OtaPorts",
    "OtaSettings",
    "chunk_filter",
    "offer_json_schema",
]

OTA_DIR = "ota"
OTA_ERRORS = (OtaError, InferenceError, OSError)


@dataclass
class _Job:
    offer: OtaOffer
    signed: SignedManifest  # verified and parsed once, when the offer was checked

    @property
    def name(self) -> str:
        return self.signed.manifest.name

    @property
    def version(self) -> int:
        return self.signed.manifest.version

    @property
    def mode(self) -> str:
        return self.offer.mode


@dataclass
class _Reply:
    """The ``cmd/ota`` reply of the running job: resolved once the bundle is received."""

    future: Future[dict[str, Any]]
    accepted: dict[str, Any]


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
        self.shadow = ShadowStore(state_dir)
        self.trust = TrustStore(state_dir)
        self.work_dir = state_dir / OTA_DIR
        self.monitor = HealthMonitor()
        s = self.settings
        self.receiver = OtaReceiver(
            self.work_dir,
            TransferSettings(s.need_after_s, s.transfer_timeout_s, s.fetch_timeout_s),
            lambda topic, payload: ports.publish(topic, payload, False),
            ports.prefix,
            ports.device_id,
        )
        self._lock = threading.Lock()
        self._jobs: queue.Queue[_Job] = queue.Queue()
        self._job: _Job | None = None
        self._reply: _Reply | None = None
        self._progress: dict[str, Any] | None = None
        self._phase = ""
        self._watch = 0  # id of the health period in progress (0: none)
        self._judge: HealthJudge | None = None  # that period's referral / QC rate tests
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

    def handle_offer(self, offer: OtaOffer) -> Future[dict[str, Any]]:
        """``cmd/ota`` handler: precheck and queue the offer; raises :class:`CommandFailed`.

        Returns the future of the reply's result, resolved once the bundle has arrived.
        """
        reason = self.unavailable_reason()
        if reason is not None:
            raise CommandFailed("unavailable", f"OTA unavailable: {reason}")
        with self._lock:
            if self._job is not None:
                raise CommandFailed("busy", f"v{self._job.version} is being installed; offer later")
            try:
                offer, signed = self._precheck(offer)
            except (RejectedError, DeliveryError, StoreError) as exc:
                log.warning("ota: offer %s rejected: %s", offer.correlation_id, exc)
                raise CommandFailed("rejected", str(exc)) from exc
            job = _Job(offer, signed)
            self._job = job
            accepted = {
                "accepted": True,
                "name": job.name,
                "version": job.version,
                "source": offer.bundle_source.kind,
                "mode": offer.mode,
                "state_topic": f"{self.ports.base_topic}/ota/state",
            }
            self._reply = _Reply(Future(), accepted)
            self.receiver.expect(offer)
            self._jobs.put(job)
            future = self._reply.future
        self.ports.set_updating(True)
        self._set_progress("offered", job)
        return future

    def _precheck(self, offer: OtaOffer) -> tuple[OtaOffer, SignedManifest]:
        """The checks of an offer before anything is received, by its mode."""
        if offer.mode == "promote":
            return self._promote_offer(offer)
        signed = precheck_offer(offer, self.trust, self.store, __version__)
        if offer.mode == "shadow":
            self._shadow_host().check_shadow(signed.manifest)
        return offer, signed

    def _promote_offer(self, offer: OtaOffer) -> tuple[OtaOffer, SignedManifest]:
        """A promote offer names the held shadow candidate (its manifest and signature); it is
        installed from the shadow slot through the normal path (gate, switch, health period)."""
        slot = self.shadow.read()
        if slot is None:
            raise RejectedError("no shadow candidate to promote")
        root = self.shadow.bundle_path(slot)
        data, signature = read_pair(root)
        if data != offer.manifest_bytes() or signature != offer.signature_bytes():
            raise RejectedError(
                f"the offer does not name the shadow candidate ({slot.name} v{slot.version})"
            )
        signed = verify_manifest(data, signature, self.trust.keys())  # trust may have changed
        check_candidate(signed.manifest, self.store.read_state().current, __version__, False)
        return offer.model_copy(update={"source": PathSource(path=str(root))}), signed

    def on_chunk(self, topic: str, payload: bytes) -> None:
        """An inline chunk arrived: hand it to the worker (dropped when not expected)."""
        self.receiver.on_chunk(topic, payload)

    # -- scan worker -----------------------------------------------------------------------------

    def slide_started(self) -> int:
        """Called with the slide lock held: the health period this slide belongs to (0: none)."""
        return self._watch

    def slide_finished(self, token: int, verdict: SlideVerdict, reason: str = "") -> None:
        """Judge the new model by a slide that started on it (``token``: its health period).

        ``ok`` counts towards the commit; ``failed`` (any failure after acquisition, non-finite
        outputs included) rolls back.  ``abstained`` and ``no_usable_field`` go to the
        period's :class:`~deploy.appliance.health.HealthJudge`: a referral rate significantly
        above the bundle's validated one rolls back, and so does a no-usable-field rate
        significantly above it when the bundle changed the QC thresholds (with the same QC, a
        slide without a usable field says nothing about the model); otherwise an abstention is
        the model doing what it was validated to do and counts like ``ok``.
        ``hardware`` (firmware, camera) neither: the period starts over, and ``ota/state``
        names the fault.
        """
        if not token or token != self._watch:
            return
        if verdict == "failed":
            self.monitor.record_slide(False, reason)
        elif verdict in ("ok", "abstained", "no_usable_field"):
            self._judge_slide(verdict, reason)
        else:
            log.warning("ota: hardware fault in the health period (period extended): %s", reason)
            self.monitor.record_hardware_fault(reason)
            job = self._job
            if job is not None:
                self._set_progress("health", job, hardware_fault=reason, extended=True)

    def _judge_slide(self, verdict: SlideVerdict, reason: str) -> None:
        judge = self._judge
        why = judge.record(verdict) if judge is not None else None
        if why is not None:
            self.monitor.record_slide(False, f"{why}; last: {reason}" if reason else why)
        elif verdict != "no_usable_field" or (judge is not None and judge.qc_changed):
            self.monitor.record_slide(True)

    def _qc_changed(self, bundle: Bundle) -> bool:
        """True when ``bundle``'s QC thresholds differ from the model it replaces (or, for a
        first model, from the defaults)."""
        from inference.spectrum.qc import QCThresholds

        try:
            previous = self.store.read_state().previous
            before = (
                self.store.open_slot(previous).manifest.qc_thresholds
                if previous is not None
                else QCThresholds()
            )
        except (StoreError, InferenceError, OSError) as exc:
            log.warning(
                "ota: previous QC unknown (%s): counting QC rejections against the model", exc
            )
            return True
        return bool(before != bundle.manifest.qc_thresholds)

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
            self._release_reply(CommandFailed("rejected", f"not received: {exc}"))
            try:
                self.store.record_outcome(
                    Outcome(result="rejected", version=job.version, reason=str(exc))
                )
            except StoreError as err:
                log.warning("ota: outcome not recorded: %s", err)
            return
        self._release_reply()
        try:
            if job.mode == "shadow":
                self._install_shadow(job, archive)
            else:
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
            checks=ota_health_checks(self.ports.connected, self._stopping, self.settings.checks),
            monitor=self.monitor,
        )
        installer = Installer(self.store, self.trust, swapper.prepare_model, hooks, self._on_step)
        try:
            options = InstallOptions(health=self.settings.health, offered=job.signed)
            result = installer.install(archive, options)
            log.info("ota: %s v%d committed", job.name, job.version)
            self._drop_promoted_shadow(result.model)
            self._set_progress("committed", job, generation=result.generation)
        except HealthCheckError as exc:
            log.warning("ota: %s", exc)
        except OTA_ERRORS as exc:
            log.warning("ota: %s v%d not installed: %s", job.name, job.version, exc)
        finally:
            swapper.discard_prepared()
            self._watch = 0
            self._unload_if_store_empty(swapper)

    def _install_shadow(self, job: _Job, archive: Path) -> None:
        """``mode: shadow``: the installer's verify/place/gate, then held beside the serving
        model (never switched to); the scanner runs it from the next slide on."""
        host = self._shadow_host()
        installer = Installer(self.store, self.trust, host.prepare_shadow, None, self._on_step)
        options = InstallOptions(offered=job.signed)
        try:
            slot = install_shadow(installer, self.shadow, archive, options)
            self._set_progress("shadow", job, sha256=slot.sha256)
        except OTA_ERRORS as exc:
            log.warning("ota: %s v%d not held as shadow: %s", job.name, job.version, exc)
            if self.swapper is not None:
                self.swapper.discard_prepared()

    def _shadow_host(self) -> ShadowHost:
        host: object = self.swapper  # a ModelSwapper that may also gate shadow candidates
        if not isinstance(host, ShadowHost):
            raise RejectedError("this scanner cannot run a shadow candidate")
        return host

    def _drop_promoted_shadow(self, committed: dict[str, Any]) -> None:
        """The shadow candidate now serves (promoted), or a version at least as new does (it
        could never be promoted: anti-rollback): it is no longer a shadow."""
        try:
            slot = self.shadow.read()
            version = committed.get("version")
            if slot is None or not isinstance(version, int):
                return
            if slot.sha256 == committed.get("sha256") or slot.version <= version:
                self.shadow.clear()
                log.info("ota: v%d serves: shadow %s v%d dropped", version, slot.name, slot.version)
        except (StoreError, OSError) as exc:
            log.warning("ota: shadow not cleared after the commit: %s", exc)

    def _unload_if_store_empty(self, swapper: ModelSwapper) -> None:
        """A first model that was rolled back leaves nothing to serve: stop serving it."""
        try:
            empty = self.store.read_state().current is None
        except StoreError:
            return
        if empty:
            with self.ports.slide_lock():
                self.ports.model_loaded(swapper.unload_model())

    def _finish_job(self) -> None:
        self._release_reply(CommandFailed("internal", "the update ended before a reply"))
        with self._lock:
            self._job = None
            self._reply = None
            self.receiver.expect(None)
        self._progress = None
        self.ports.set_updating(False)
        self.publish_state()

    # -- receiving ---------------------------------------------------------------------------------

    def _receive(self, job: _Job, stop: threading.Event) -> Path:
        self._set_progress("receiving", job, source=job.offer.bundle_source.kind)
        path = self.receiver.receive(job.offer, lambda: stop.is_set() or self._stopping.is_set())
        self._set_progress("received", job)
        return path

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
            self._judge = HealthJudge(
                ValidatedRates.of(bundle),
                qc_changed=self._qc_changed(bundle),
                significance=self.settings.significance,
            )
        else:
            self._watch = 0
            self._judge = None
        self.ports.model_loaded(info)

    # -- replies, state ----------------------------------------------------------------------------

    def _release_reply(self, error: CommandFailed | None = None) -> None:
        """Answer the offer (once): received, or refused with ``error``."""
        with self._lock:
            reply, self._reply = self._reply, None
        if reply is None or reply.future.done():
            return
        if error is None:
            reply.future.set_result({**reply.accepted, "received": True})
        else:
            reply.future.set_exception(error)

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
        try:
            shadow = self.shadow.describe()
        except StoreError as exc:
            log.warning("ota: shadow state unreadable: %s", exc)
            shadow = None
        return ota_state_payload(self.store, self._progress, shadow)

    def publish_state(self) -> None:
        """Publish the retained ``ota/state`` (also on every reconnect)."""
        try:
            payload = self.state()
        except StoreError as exc:
            log.error("ota: state unreadable: %s", exc)
            return
        if self.ports.shadow_changed is not None:
            self.ports.shadow_changed(payload.get("shadow"))
        try:
            validate("ota_state", payload)
        except SchemaError as exc:
            log.error("ota: ota/state does not match its schema: %s", exc)
        body = strict_json(payload)
        self.ports.publish(f"{self.ports.base_topic}/ota/state", body, True)

    def stop(self) -> None:
        """Shutting down: a transfer is abandoned and a health period fails (rolled back)."""
        self._stopping.set()
        if self._watch:
            self.monitor.record_check(False, "the appliance is stopping")
