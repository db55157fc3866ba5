"""Installing a bundle: verify, stage, check the engine, switch between slides, watch, commit.

Steps (each reported to ``on_step`` after it is durable; ``docs/ota.md`` has the full story):

====== ====================================================================================
begin     the journal names a new transaction; nothing else exists yet
staged    the .tar is unpacked safely (or the directory copied) under ``staging/<txn>``
verified  signature against the trust store, every file hash, version, ``min_app_version``
placed    the bundle is moved (``os.replace``) to ``bundles/``; the journal names it
checked   the engine was built or loaded and reproduced the golden outputs
switched  ``state.json`` names the new model as current, pending; the service swapped it
health    the health period is being watched
committed / rolled_back   the end: the new model stays, or the previous one is back
====== ====================================================================================

Before ``switched`` a failure (or a kill) leaves the serving model untouched; after it the
health verdict, or :meth:`ModelStore.recover` at the next start, decides.
"""

from __future__ import annotations

import hashlib
import logging
import re
import secrets
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from deploy import __version__
from deploy.ota.exceptions import (
    DowngradeError,
    HealthCheckError,
    IncompatibleError,
    ModelCheckError,
    OtaError,
    RejectedError,
    StoreError,
)
from deploy.ota.signing import (
    SignedManifest,
    VerifiedBundle,
    expected_verifier,
    manifest_verifier,
    verify_dir,
)
from deploy.ota.store import Journal, ModelStore, Outcome, Slot
from deploy.ota.trust import TrustStore
from deploy.ota.unpack import UnpackLimits, copy_tree_checked, is_archive, verified_extract
from inference.bundle import Bundle, Manifest, now_rfc3339
from inference.exceptions import InferenceError
from inference.qc_acceptance import QCAcceptanceError, check_qc_acceptance

log = logging.getLogger(__name__)

#: ``(bundle) -> None``: build or load the engine and pass the golden gate, else raise.
ModelChecker = Callable[[Bundle], None]
#: ``(step, detail) -> None``: progress after each durable step (ota/state, tests).
StepCallback = Callable[[str, dict[str, Any]], None]
Verdict = Literal["pending", "healthy", "unhealthy"]


# -- health ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class HealthPolicy:
    """When a switched model is committed: ``slides`` good slides in a row, or ``seconds``
    (monotonic) of passing checks with no failure, whichever comes first.  Any failed slide or
    check rolls back at once.  Checks run every ``check_interval_s``."""

    slides: int = 3
    seconds: float = 60.0
    check_interval_s: float = 5.0


class HealthMonitor:
    """Thread-safe health verdict; the service feeds it slide outcomes while the installer waits.

    Uses ``time.monotonic`` only: the wall clock of a device may be wrong.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._cond = threading.Condition()
        self._policy = HealthPolicy()
        self._started = 0.0
        self._slides_ok = 0
        self._checks_ok = 0
        self._failure: str | None = None
        self.hardware_fault: str | None = None  # the last one in this period

    def start(self, policy: HealthPolicy) -> None:
        """Begin a health period."""
        with self._cond:
            self._policy = policy
            self._started = self._clock()
            self._slides_ok = self._checks_ok = 0
            self._failure = None
            self.hardware_fault = None

    def record_slide(self, ok: bool, reason: str = "") -> None:
        """The service finished a slide with the new model (``ok``) or failed on it."""
        with self._cond:
            if ok:
                self._slides_ok += 1
            elif self._failure is None:
                self._failure = f"slide failed: {reason or 'unknown error'}"
            self._cond.notify_all()

    def record_hardware_fault(self, reason: str) -> None:
        """A slide failed in the hardware (firmware, camera): that says nothing about the model,
        so it neither fails the period nor commits it; the period starts over (extends)."""
        with self._cond:
            self._started = self._clock()
            self._slides_ok = 0
            self.hardware_fault = reason
            self._cond.notify_all()

    def record_check(self, ok: bool, reason: str = "") -> None:
        """One round of application checks passed, or failed with ``reason``."""
        with self._cond:
            if ok:
                self._checks_ok += 1
            elif self._failure is None:
                self._failure = f"health check failed: {reason}"
            self._cond.notify_all()

    @property
    def failure(self) -> str | None:
        """Why the period failed, if it did."""
        return self._failure

    def verdict(self) -> Verdict:
        """``pending``, ``healthy`` or ``unhealthy``."""
        with self._cond:
            return self._verdict()

    def _verdict(self) -> Verdict:
        p = self._policy
        if self._failure is not None:
            return "unhealthy"
        if self._checks_ok == 0:
            return "pending"  # at least one round of application checks, always
        if p.slides > 0 and self._slides_ok >= p.slides:
            return "healthy"
        return "healthy" if self._clock() - self._started >= p.seconds else "pending"

    def wait(self, timeout: float) -> Verdict:
        """Wait up to ``timeout`` seconds for a decided verdict; return the verdict."""
        with self._cond:
            if self._verdict() == "pending":
                remaining = self._policy.seconds - (self._clock() - self._started)
                self._cond.wait(max(0.0, min(timeout, remaining)))
            return self._verdict()


@dataclass
class ServiceHooks:
    """What a running service lends the installer.

    ``between_slides`` is held while the switch (and a rollback) happens, so a slide is never
    split between two models.  ``load`` makes the service serve a bundle (already gated); it
    raises to refuse and must then keep the old one.  ``checks`` are application health checks
    (broker reachable, firmware handshake, …) that raise on failure.  ``monitor`` receives the
    service's slide outcomes during the health period.
    """

    between_slides: Callable[[], AbstractContextManager[object]] = nullcontext
    load: Callable[[Bundle], None] | None = None
    checks: Sequence[Callable[[], None]] = ()
    monitor: HealthMonitor = field(default_factory=HealthMonitor)


@dataclass(frozen=True)
class InstallOptions:
    """Local knobs of one install."""

    allow_downgrade: bool = False
    app_version: str = __version__
    limits: UnpackLimits = field(default_factory=UnpackLimits)
    health: HealthPolicy = field(default_factory=lambda: HealthPolicy(slides=0, seconds=0.0))
    # The manifest an offer carried, verified when the offer was checked: the bundle's bytes
    # are compared with it instead of being verified and parsed a second time.
    offered: SignedManifest | None = None


@dataclass(frozen=True)
class InstallResult:
    """A committed install."""

    outcome: str
    model: dict[str, Any]
    previous: dict[str, Any] | None
    generation: int

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (``omis ota install --json``)."""
        return {
            "outcome": self.outcome,
            "model": self.model,
            "previous": self.previous,
            "generation": self.generation,
        }


def _version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", text)[:3])


def check_candidate(
    manifest: Manifest, current: Slot | None, app_version: str, allow_downgrade: bool
) -> None:
    """Anti-rollback and application compatibility; raises a :class:`RejectedError`."""
    if current is not None and manifest.version <= current.version and not allow_downgrade:
        what = (
            "already installed (replayed offer?)"
            if manifest.version == current.version
            else ("older than the current one")
        )
        raise DowngradeError(
            f"version {manifest.version} is {what}: current is v{current.version}; versions must "
            "grow (a local operator may pass --allow-downgrade)"
        )
    if _version_tuple(manifest.min_app_version) > _version_tuple(app_version):
        raise IncompatibleError(
            f"bundle needs application >= {manifest.min_app_version}, this is {app_version}"
        )


def _check_qc(bundle: Bundle) -> None:
    """The bundle's QC thresholds must accept its own golden fields (inference.qc_acceptance)."""
    try:
        check_qc_acceptance(bundle)
    except QCAcceptanceError as exc:
        raise RejectedError(str(exc)) from exc
    except InferenceError as exc:
        raise RejectedError(f"QC acceptance check: {exc}") from exc


class Installer:
    """Runs installs and rollbacks against one store, trust store, model checker and service."""

    def __init__(
        self,
        store: ModelStore,
        trust: TrustStore,
        checker: ModelChecker,
        hooks: ServiceHooks | None = None,
        on_step: StepCallback | None = None,
    ) -> None:
        self.store = store
        self.trust = trust
        self.checker = checker
        self.hooks = hooks or ServiceHooks()
        self._on_step = on_step

    def _step(self, step: str, **detail: Any) -> None:
        log.info("ota: %s %s", step, detail or "")
        if self._on_step is not None:
            self._on_step(step, detail)

    def install(self, source: Path, options: InstallOptions | None = None) -> InstallResult:
        """Install ``source`` (directory or .tar) end to end; raises on rejection or rollback."""
        opts = options or InstallOptions()
        with self.store.lock():
            self.store.recover()
            slot, bundle = self.prepare(source, opts)
            self.switch(slot, bundle, opts.health)
            return self.watch(slot, opts.health)

    # -- before the switch: nothing that serves changes -----------------------------------------

    def prepare(self, source: Path, opts: InstallOptions) -> tuple[Slot, Bundle]:
        """Stage, verify, place and gate a bundle; on failure undo it and record ``rejected``."""
        with self.store.lock():
            txn = secrets.token_hex(8)
            self.store.write_journal(Journal(txn=txn, step="begin"))
            self._step("begin", source=str(source))
            version: int | None = None
            try:
                verified = self._stage(source, self.store.staging_path(txn), opts)
                root = verified.bundle.root
                self._step("staged")
                version = verified.bundle.manifest.version
                check_candidate(
                    verified.bundle.manifest,
                    self.store.read_state().current,
                    opts.app_version,
                    opts.allow_downgrade,
                )
                _check_qc(verified.bundle)
                self._step("verified", version=version, signer=verified.signer)
                slot = _slot_for(verified.bundle, verified.signer, txn)
                return slot, self._place_and_check(txn, root, slot, verified.bundle)
            except OtaError as exc:
                self._reject(version, exc)
                raise
            except Exception as exc:  # whatever failed: undo it all, then say why
                self._reject(version, exc)
                what = "" if isinstance(exc, OSError) else f"{type(exc).__name__}: "
                raise RejectedError(f"install failed: {what}{exc}") from exc

    def _stage(self, source: Path, staging: Path, opts: InstallOptions) -> VerifiedBundle:
        """Copy or unpack ``source`` once, verifying its signature once (or comparing it with
        the offer's, verified already) and parsing its manifest once."""
        if source.is_dir():
            root = copy_tree_checked(source, staging / "bundle", opts.limits)
            return verify_dir(root, self.trust.keys(), opts.offered)
        if not is_archive(source):
            raise RejectedError(f"{source}: neither a bundle directory nor a tar archive")
        # Signature and signed sizes are checked before anything expands; each file's sha256
        # is checked as it is written, so the unpacked tree needs no second pass.
        found: list[SignedManifest] = []
        if opts.offered is None:
            verify = manifest_verifier(self.trust.keys(), found)
        else:
            found.append(opts.offered)
            verify = expected_verifier(opts.offered)
        root = verified_extract(source, staging / "bundle", verify, opts.limits)
        return VerifiedBundle(found[0].bundle(root), found[0].signer)

    def _place_and_check(self, txn: str, root: Path, slot: Slot, bundle: Bundle) -> Bundle:
        # The journal names the candidate before the move, so recover() can find its directory.
        self.store.write_journal(Journal(txn=txn, step="placing", candidate=slot))
        target = self.store.bundle_path(slot)
        target.parent.mkdir(parents=True, exist_ok=True)
        root.replace(target)
        self.store.write_journal(Journal(txn=txn, step="placed", candidate=slot))
        self._step("placed", dir=slot.dir)
        placed = replace(bundle, root=target)
        try:
            self.checker(placed)
        except InferenceError as exc:
            raise ModelCheckError(f"model check failed: {exc}") from exc
        self.store.write_journal(Journal(txn=txn, step="checked", candidate=slot))
        self._step("checked")
        return placed

    def _reject(self, version: int | None, exc: BaseException) -> None:
        log.warning("ota: rejected: %s", exc)
        self.store.clear_journal()
        self.store.collect_garbage()
        self.store.record_outcome(Outcome(result="rejected", version=version, reason=str(exc)))
        self._step("rejected", reason=str(exc))

    # -- the switch and the health period ---------------------------------------------------------

    def switch(self, slot: Slot, bundle: Bundle, policy: HealthPolicy) -> None:
        """Make ``slot`` current (pending) between two slides and let the service load it.

        The health period starts here, so slides served by the new model count towards it.
        """
        self.hooks.monitor.start(policy)
        with self.store.lock(), self.hooks.between_slides():
            journal = self.store.read_journal()
            self.store.activate(slot)
            if journal is not None:
                self.store.write_journal(journal.model_copy(update={"step": "switched"}))
            self._step("switched", version=slot.version)
            if self.hooks.load is not None:
                try:
                    self.hooks.load(bundle)
                except (OtaError, InferenceError, OSError) as exc:
                    self.hooks.monitor.record_check(False, f"service could not load it: {exc}")

    def watch(self, slot: Slot, policy: HealthPolicy) -> InstallResult:
        """Run the health period; commit, or roll back and raise :class:`HealthCheckError`."""
        monitor = self.hooks.monitor
        with self.store.lock():
            self._step("health", slides=policy.slides, seconds=policy.seconds)
            verdict: Verdict = monitor.verdict()
            while verdict == "pending":
                self._run_checks(monitor)
                verdict = monitor.wait(policy.check_interval_s)
            if verdict == "unhealthy":
                reason = monitor.failure or "unhealthy"
                self.rollback(reason)
                raise HealthCheckError(f"v{slot.version} rolled back: {reason}")
            st = self.store.commit()
            self._step("committed", version=slot.version)
            return InstallResult(
                outcome="committed",
                model=slot.describe(),
                previous=st.previous.describe() if st.previous else None,
                generation=st.generation,
            )

    def _run_checks(self, monitor: HealthMonitor) -> None:
        for check in self.hooks.checks:
            try:
                check()
            except (OtaError, InferenceError, OSError) as exc:
                monitor.record_check(False, str(exc))
                return
        monitor.record_check(True)

    def rollback(self, reason: str) -> dict[str, Any] | None:
        """Go back to the previous model between slides; returns it (None: no model now)."""
        with self.store.lock(), self.hooks.between_slides():
            st = self.store.rollback(reason)
            self._step("rolled_back", reason=reason)
            if st.current is None:
                return None
            if self.hooks.load is not None:
                try:
                    self.hooks.load(self.store.open_slot(st.current))
                except (OtaError, InferenceError, OSError) as exc:
                    raise StoreError(
                        f"rolled back to v{st.current.version}, but the service could not load "
                        f"it ({exc}); restart the service"
                    ) from exc
            return st.current.describe()


def _slot_for(bundle: Bundle, signer: str, txn: str) -> Slot:
    manifest_sha = hashlib.sha256(bundle.manifest_bytes).hexdigest()
    m = bundle.manifest
    return Slot(
        dir=f"v{m.version}-{manifest_sha[:12]}-{txn[:8]}",
        name=m.name,
        version=m.version,
        sha256=bundle.model_sha256,
        manifest_sha256=manifest_sha,
        signer=signer,
        installed_at=now_rfc3339(),
    )
