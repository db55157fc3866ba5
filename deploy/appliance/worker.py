"""The scan worker: a bounded queue, one slide at a time, cancel, one outcome per scan.

Every accepted scan ends in exactly one result through the :class:`ResultPublisher`: its
report when the slide was classified or abstained, a ``failed`` result (stage and reason) when
the device path broke, a ``cancelled`` one when it was cancelled (``cmd/cancel``) or abandoned
or dropped from the queue at shutdown.  The worker holds the slide lock while a slide is in
progress, so an OTA switch never lands inside a slide; each slide that started on a model in its
health period is reported to the OTA controller.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from deploy.appliance.base import (
    ScannerInfo,
    ScanRequest,
    ShadowOutcome,
    ShadowRunner,
    SlideScanner,
    SlideVerdict,
)
from deploy.appliance.publisher import ResultPublisher
from deploy.appliance.queue import ScanQueue
from deploy.appliance.results import Identity, ResultMessage, build_result, rfc3339
from deploy.appliance.shadow import build_shadow
from deploy.exceptions import DeployError, ScanCancelledError, ScanRejectedError
from deploy.messages.shadow import ShadowMessage
from firmware_bridge.exceptions import BridgeError
from inference.exceptions import InferenceError
from inference.result import (
    AbstainReason,
    Outcome,
    SlideReport,
    Stage,
    cancelled,
    failed,
    stage_of,
)

log = logging.getLogger(__name__)

ABANDON_WAIT_S = 10.0
MAX_KEPT = 10000  # committed results / failure reasons kept: the daemon runs for months
SCAN_ERRORS = (DeployError, BridgeError, InferenceError)


@dataclass(frozen=True)
class CommittedResult:
    """A result that is safely in the outbox."""

    message_id: str
    scan_id: str
    slide_id: str
    seq: int
    label: str | None  # the decision (None when undecided)
    outcome: str = Outcome.CLASSIFIED.value
    reason: str | None = None
    side: str | None = None  # undecided: where p(high) leans


@dataclass
class Counters:
    """Counters published as metrics."""

    scans_ok: int = 0
    scans_failed: int = 0
    scans_cancelled: int = 0
    scans_rejected: int = 0
    scan_ms: deque[float] = field(default_factory=lambda: deque(maxlen=100))


@dataclass(frozen=True)
class ScanPorts:
    """What the service lends the worker."""

    publisher: ResultPublisher
    has_room: Callable[[], bool]  # the outbox can take another result
    slide_started: Callable[[], int]  # OTA health period token
    slide_finished: Callable[[int, SlideVerdict, str], None]  # judges a model on probation
    status_changed: Callable[[], object]
    record_error: Callable[[str, str], None]
    info: Callable[[], ScannerInfo | None]  # what serves now (for failed results)
    model_seen: Callable[[dict[str, Any] | None], None]
    shadow: Callable[[ShadowMessage], None] | None = None  # commits omis.shadow/1 messages


# Abstentions decided by the device's quality control before (or regardless of) the model.
_QC_ABSTAIN = (AbstainReason.INSUFFICIENT_FIELDS.value,)  # the device's setting, not the model


def verdict_of(report: SlideReport) -> SlideVerdict | None:
    """How a slide judges the model that produced it (None: it says nothing, e.g. cancelled).

    A failure in acquisition is the hardware's (firmware, camera); any later failure is the
    device path's, which the model's bundle defines (spectrum, render, input, outputs).  A slide
    whose every field failed quality control never reached the model (``no_usable_field``): the
    OTA health period counts it against the model only when the bundle changed the QC
    thresholds (a dark camera or an empty slide is not the model's fault).  A slide with too few
    usable fields (``insufficient_fields``, the device's ``scan.min_usable_fields``) says nothing
    about the model either.
    """
    if report.outcome is Outcome.CLASSIFIED:
        return "ok"
    if report.outcome is Outcome.ABSTAINED:
        if report.reason == AbstainReason.NO_USABLE_FIELD.value:
            return "no_usable_field"
        return None if report.reason in _QC_ABSTAIN else "abstained"
    if report.outcome is Outcome.FAILED:
        return "hardware" if report.stage is Stage.ACQUIRE else "failed"
    return None


def stage_of_scan_error(exc: BaseException) -> Stage:
    """Where a scan error happened: the microscope, a stage of the pipeline, the model."""
    if isinstance(exc, BridgeError):
        return Stage.ACQUIRE
    cause = exc.__cause__
    if isinstance(exc, DeployError) and isinstance(cause, InferenceError):
        return stage_of(cause, Stage.MODEL)
    return stage_of(exc, Stage.INTERNAL)


class ScanWorker:
    """Runs queued scans one at a time and commits one result per scan."""

    def __init__(
        self,
        identity: Identity,
        scanner: SlideScanner,
        queue: ScanQueue,
        ports: ScanPorts,
        counters: Counters | None = None,
    ) -> None:
        self.identity = identity
        self.scanner = scanner
        self.queue = queue
        self.ports = ports
        self.counters = counters or Counters()
        self.committed: deque[CommittedResult] = deque(maxlen=MAX_KEPT)
        self.slide_lock = threading.Lock()  # held while a slide is in progress
        self.stopping = threading.Event()
        self._seq = 0
        self._seq_lock = threading.Lock()

    # -- intake ----------------------------------------------------------------------------

    def submit(self, request: ScanRequest) -> int:
        """Queue a scan; returns its queue position.  Raises ScanRejectedError."""
        try:
            if self.stopping.is_set():
                raise ScanRejectedError("the appliance is stopping", "stopping")
            if not self.ports.has_room():
                self.ports.status_changed()
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

    # -- the worker loop -------------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        """Worker loop (supervised): one scan at a time until ``stop`` is set."""
        while not stop.is_set():
            request = self.queue.get(timeout_s=0.5)
            if request is None:
                continue
            try:
                self.ports.status_changed()
                self.scan_one(request)
            finally:
                self.queue.done()
                self.ports.status_changed()

    def scan_one(self, request: ScanRequest) -> ResultMessage:
        """Scan one slide and commit its result, whatever its outcome."""
        with self.slide_lock:  # a model switch waits for the end of this slide
            started = rfc3339()  # after the lock: the slide starts on the model serving now
            t0 = time.monotonic()
            health = self.ports.slide_started()
            report = self._scan(request)
        verdict = verdict_of(report)
        if verdict is not None:
            self.ports.slide_finished(health, verdict, f"slide {request.slide_id}: {report.reason}")
        if report.outcome in (Outcome.CLASSIFIED, Outcome.ABSTAINED):
            self.ports.model_seen(report.model.model_dump() if report.model else None)
            self.counters.scan_ms.append((time.monotonic() - t0) * 1000.0)
            self.counters.scans_ok += 1
        result = self._commit(request, started, report)
        shadow = self._take_shadow()  # after the serving result is safe: never delays it
        if shadow is not None:
            self._commit_shadow(result, shadow)
        return result

    def _take_shadow(self) -> ShadowOutcome | None:
        scanner = self.scanner
        return scanner.take_shadow() if isinstance(scanner, ShadowRunner) else None

    def _commit_shadow(self, result: ResultMessage, shadow: ShadowOutcome) -> None:
        """The candidate's call after the serving result is safe (never instead of it)."""
        message = build_shadow(self.identity, result, shadow)
        if message is not None and self.ports.shadow is not None:
            self.ports.shadow(message)

    def _scan(self, request: ScanRequest) -> SlideReport:
        try:
            return self.scanner.scan(request, self.queue.cancel_event)
        except ScanCancelledError as exc:
            self.counters.scans_cancelled += 1
            log.warning("scan %s cancelled: %s", request.scan_id, exc)
            return self._cancelled(str(exc))
        except SCAN_ERRORS as exc:
            self.counters.scans_failed += 1
            self.ports.record_error("scan_failed", f"slide {request.slide_id}: {exc}")
            log.error("scan %s of slide %s failed: %s", request.scan_id, request.slide_id, exc)
            return self._failed(stage_of_scan_error(exc), str(exc))
        except Exception as exc:  # a defect: still one published outcome for this scan
            self.counters.scans_failed += 1
            self.ports.record_error("scan_failed", f"slide {request.slide_id}: {exc!r}")
            log.exception("scan %s of slide %s: internal error", request.scan_id, request.slide_id)
            return self._failed(stage_of(exc, Stage.INTERNAL), f"{type(exc).__name__}: {exc}")

    def _serving(self) -> dict[str, Any]:
        info = self.ports.info()
        return {"model": info.model if info else None, "backend": info.engine if info else None}

    def _failed(self, stage: Stage, reason: str) -> SlideReport:
        return failed(stage, reason, **self._serving())

    def _cancelled(self, reason: str) -> SlideReport:
        return cancelled(reason, **self._serving())

    def _commit(self, request: ScanRequest, started: str, report: SlideReport) -> ResultMessage:
        with self._seq_lock:
            self._seq += 1
            seq = self._seq
        result = build_result(
            self.identity,
            seq=seq,
            request=request,
            started_at=started,
            finished_at=rfc3339(),
            report=report,
        )
        self.ports.publisher.commit(result)
        self.committed.append(
            CommittedResult(
                result.message_id,
                result.scan_id,
                result.slide_id,
                result.seq,
                result.prediction.label,
                result.outcome.value,
                result.reason,
                result.prediction.side,
            )
        )
        return result

    # -- firmware events, shutdown ---------------------------------------------------------

    def on_slide_inserted(self, slide_id: str, fields: int, plan: str) -> None:
        """The firmware reported a slide inserted: scan it (or say why not)."""
        request = ScanRequest(slide_id, fields, plan, "firmware")
        try:
            self.submit(request)
        except ScanRejectedError as exc:
            self.ports.record_error(exc.code, f"slide {slide_id} inserted: {exc}")
            log.error("slide %s inserted but not scanned: %s", slide_id, exc)

    def finish(self, grace_s: float) -> None:
        """Stop taking scans; waiting ones end ``cancelled``; the running one may finish
        within ``grace_s``, else it is cancelled between fields (and ends ``cancelled``)."""
        self.stopping.set()
        for request in self.queue.close():
            log.warning(
                "stopping: queued scan %s of slide %s dropped", request.scan_id, request.slide_id
            )
            self.counters.scans_cancelled += 1
            self._commit(request, rfc3339(), self._cancelled("the appliance stopped first"))
        if self.queue.wait_idle(grace_s):
            return
        abandoned = self.queue.cancel()
        log.warning("stopping: slide scan %s abandoned after %.0f s grace", abandoned, grace_s)
        self.queue.wait_idle(ABANDON_WAIT_S)
