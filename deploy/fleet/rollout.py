"""A staged rollout: the canary wave first, then the rest in waves; halt at the first failure.

Each wave's devices are offered the bundle at once (one thread each) and the wave ends when
every one of them reached a final step: ``committed`` (the device's health period passed),
``rejected`` (refused before it served: signature, version, golden gate), ``rolled_back`` (it
served and failed its health period) or ``timeout`` (no answer in time).  Any failure halts
the rollout after that wave: later waves stay ``pending`` and untouched.  Every step is
written to the archive as it happens, so a restarted command resumes: committed devices are
skipped, a device left ``offered`` is asked for its current version first and only offered
again when it does not serve the bundle yet.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

from deploy.fleet.store import FAILURES, SUCCESS, DeviceStep, FleetStore, RolloutRecord

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DeviceOutcome:
    """How one device's offer ended: a final step, the version it serves, and why."""

    step: str
    version: int | None = None
    detail: str = ""


class Offerer(Protocol):
    """Delivers the rollout's bundle to one device (over MQTT in production)."""

    def current_version(self, device_id: str) -> int | None:
        """The model version the device serves now (None: unknown / no answer)."""

    def offer(self, device_id: str) -> DeviceOutcome:
        """Offer the bundle and wait for the device's final step."""

    def offer_shadow(self, device_id: str) -> DeviceOutcome:
        """Offer the bundle in shadow mode; ``shadow`` once the device holds it."""

    def promote(self, device_id: str) -> DeviceOutcome:
        """Promote the device's shadow candidate; waits for its final step."""


class ShadowJudge(Protocol):
    """Judges a device's shadow comparison from the archive (``--shadow-first``)."""

    def verdict(self, device_id: str) -> tuple[bool | None, str]:
        """``(None, why)`` while too few slides are compared, else ``(passed, why)``."""


@dataclass(frozen=True)
class ShadowFirst:
    """``--shadow-first``: how canaries are judged before they are promoted."""

    judge: ShadowJudge
    wait_s: float = 3600.0  # for the slides to be scanned and archived
    poll_s: float = 2.0


Progress = Callable[[str, DeviceStep], None]


@dataclass(frozen=True)
class RolloutResult:
    """The end of one run of a rollout."""

    record: RolloutRecord
    halted: bool
    reason: str | None


class RolloutRunner:
    """Drives one stored rollout to its end (or its halt); safe to run again after a kill."""

    def __init__(
        self,
        store: FleetStore,
        offerer: Offerer,
        *,
        heartbeat_s: float = 5.0,
        progress: Progress | None = None,
        shadow_first: ShadowFirst | None = None,
    ) -> None:
        self.store = store
        self.offerer = offerer
        self.shadow_first = shadow_first
        self.heartbeat_s = heartbeat_s
        self.progress = progress or (lambda _msg, _step: None)

    def run(self, rollout_id: int) -> RolloutResult:
        """Run every unfinished wave; returns the final record and whether it halted."""
        stop = threading.Event()
        beat = threading.Thread(target=self._beat, args=(rollout_id, stop), daemon=True)
        beat.start()
        try:
            reason = self._waves(self.store.rollout(rollout_id))
        finally:
            stop.set()
            beat.join(5)
        if reason is None:
            self.store.finish(rollout_id, "completed")
        else:
            self.store.finish(rollout_id, "halted", reason)
        return RolloutResult(self.store.rollout(rollout_id), reason is not None, reason)

    def _beat(self, rollout_id: int, stop: threading.Event) -> None:
        while not stop.wait(self.heartbeat_s):
            try:
                self.store.heartbeat(rollout_id)
            except Exception:
                log.warning("rollout %s: heartbeat failed", rollout_id, exc_info=True)

    def _waves(self, record: RolloutRecord) -> str | None:
        version = record.bundle.version
        for number, wave in enumerate(record.waves()):
            failed = [d for d in wave if d.step in FAILURES]
            if failed:  # halted earlier: a resumed run does not go past it
                return _halt_reason(number, failed)
            todo = [d for d in wave if d.step != SUCCESS]
            if not todo:
                continue
            log.info("wave %d: offering version %d to %s", number, version, _names(todo))
            outcomes = self._offer_wave(record.id, todo, version, shadow=number == 0)
            failed = [d for d in outcomes if d.step in FAILURES]
            if failed:
                return _halt_reason(number, failed)
        return None

    def _offer_wave(
        self, rollout_id: int, todo: list[DeviceStep], version: int, shadow: bool = False
    ) -> list[DeviceStep]:
        one = self._shadow_one if shadow and self.shadow_first is not None else self._one
        with ThreadPoolExecutor(max_workers=len(todo), thread_name_prefix="rollout") as pool:
            return list(pool.map(lambda d: one(rollout_id, d, version), todo))

    def _shadow_one(self, rollout_id: int, device: DeviceStep, version: int) -> DeviceStep:
        """A canary with ``--shadow-first``: shadow -> compared on its slides -> promoted ->
        committed (the normal health period).  Each step is stored, so a rerun resumes."""
        name, first = device.device_id, self.shadow_first
        if first is None:
            return self._one(rollout_id, device, version)
        if device.step in ("pending", "offered"):
            device = self._record(rollout_id, device, DeviceOutcome("offered"))
            device = self._record(rollout_id, device, self._try(self.offerer.offer_shadow, name))
            if device.step != "shadow":
                return device
        if device.step == "shadow":
            outcome = self._compare(name, first)
            if outcome is not None:
                return self._record(rollout_id, device, outcome)
            device = self._record(rollout_id, device, DeviceOutcome("promoted"))
        current = self.offerer.current_version(name)  # a resumed "promoted" may be done
        if current is not None and current >= version:
            return self._record(rollout_id, device, DeviceOutcome(SUCCESS, current, "promoted"))
        return self._record(rollout_id, device, self._try(self.offerer.promote, name))

    def _compare(self, name: str, first: ShadowFirst) -> DeviceOutcome | None:
        """Wait for enough compared slides; None when the comparison passed."""
        deadline = time.monotonic() + first.wait_s
        while True:
            passed, why = first.judge.verdict(name)
            if passed is True:
                log.info("%s: shadow comparison passed: %s", name, why)
                return None
            if passed is False:
                return DeviceOutcome("compare_failed", None, why)
            if time.monotonic() >= deadline:
                return DeviceOutcome("timeout", None, f"shadow comparison: {why}")
            time.sleep(first.poll_s)

    @staticmethod
    def _try(call: Callable[[str], DeviceOutcome], name: str) -> DeviceOutcome:
        try:
            return call(name)
        except Exception as exc:
            log.warning("%s: offer failed: %s", name, exc, exc_info=True)
            return DeviceOutcome("timeout", None, f"offer failed: {exc}")

    def _one(self, rollout_id: int, device: DeviceStep, version: int) -> DeviceStep:
        name = device.device_id
        if device.step == "offered":  # interrupted after the offer: does it serve it already?
            current = self.offerer.current_version(name)
            if current is not None and current >= version:
                return self._record(rollout_id, device, DeviceOutcome(SUCCESS, current, "resumed"))
        self._record(rollout_id, device, DeviceOutcome("offered", None, ""))
        try:
            outcome = self.offerer.offer(name)
        except Exception as exc:
            log.warning("%s: offer failed: %s", name, exc, exc_info=True)
            outcome = DeviceOutcome("timeout", None, f"offer failed: {exc}")
        return self._record(rollout_id, device, outcome)

    def _record(self, rollout_id: int, device: DeviceStep, outcome: DeviceOutcome) -> DeviceStep:
        self.store.set_step(
            rollout_id,
            device.device_id,
            outcome.step,
            version=outcome.version,
            detail=outcome.detail or None,
        )
        step = DeviceStep(
            device.device_id,
            device.position,
            device.wave,
            outcome.step,
            outcome.version,
            outcome.detail or None,
        )
        self.progress(f"{device.device_id}: {outcome.step}", step)
        return step


def _names(steps: list[DeviceStep]) -> str:
    return ", ".join(d.device_id for d in steps)


def _halt_reason(wave: int, failed: list[DeviceStep]) -> str:
    parts = [f"{d.device_id} {d.step}" + (f" ({d.detail})" if d.detail else "") for d in failed]
    return f"halted in wave {wave}: " + "; ".join(parts)
