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
    ) -> None:
        self.store = store
        self.offerer = offerer
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
            outcomes = self._offer_wave(record.id, todo, version)
            failed = [d for d in outcomes if d.step in FAILURES]
            if failed:
                return _halt_reason(number, failed)
        return None

    def _offer_wave(
        self, rollout_id: int, todo: list[DeviceStep], version: int
    ) -> list[DeviceStep]:
        with ThreadPoolExecutor(max_workers=len(todo), thread_name_prefix="rollout") as pool:
            return list(pool.map(lambda d: self._one(rollout_id, d, version), todo))

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
