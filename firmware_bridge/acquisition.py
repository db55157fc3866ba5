"""Field-pair acquisition: move, settle, diffuse capture, polarized capture, LEDs off, QC.

:func:`acquire_fields` drives any :class:`~firmware_bridge.base.Controller` and
:class:`~firmware_bridge.base.Camera` through a :class:`ScanPlan` and yields one
:class:`FieldPair` per field.  The LEDs are off whenever a field is not being exposed, also
on errors.  A firmware reset, watchdog or fault during a field invalidates that field: after a
reset the stage is homed again and the field retaken (bounded), anything else is an error.
Recording the pairs of a :class:`~firmware_bridge.microscope_base.Microscope` into a directory
is :func:`firmware_bridge.microscope_base.record_acquisition`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from firmware_bridge.base import (
    Camera,
    Controller,
    ControllerEvent,
    Illumination,
    Position,
    RGBImage,
)
from firmware_bridge.exceptions import (
    BridgeError,
    BridgeOperationError,
    DeviceResetError,
    InputError,
)
from firmware_bridge.validation import first_error

log = logging.getLogger(__name__)

# Events after which frames of the current field cannot be trusted.
DISRUPTIVE_EVENTS = frozenset({"watchdog", "fault", "over_temperature", "limit_hit", "boot"})

QualityCheck = Callable[["FieldPair"], Mapping[str, Any] | None]


class ScanPlan(BaseModel):
    """Which fields to visit on the slide, in which order."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, frozen=True)

    pattern: Literal["grid", "serpentine"] = Field(
        "serpentine", description="row by row left to right (grid) or boustrophedon"
    )
    fields: int = Field(4, ge=1, le=100_000, description="number of fields")
    origin_um: tuple[float, float] = Field(
        (5000.0, 5000.0), description="stage position (x, y) of the first field, µm"
    )
    step_um: tuple[float, float] = Field(
        (800.0, 800.0), description="distance between neighbouring fields (x, y), µm"
    )
    columns: int | None = Field(
        None, ge=1, description="fields per row; default ceil(sqrt(fields))"
    )
    z_um: float = Field(0.0, description="focus position for every field, µm")

    def positions(self) -> list[Position]:
        """The stage positions in visiting order."""
        cols = self.columns or math.ceil(math.sqrt(self.fields))
        out = []
        for k in range(self.fields):
            row, col = divmod(k, cols)
            if self.pattern == "serpentine" and row % 2 == 1:
                col = cols - 1 - col
            out.append(
                Position(
                    self.origin_um[0] + col * self.step_um[0],
                    self.origin_um[1] + row * self.step_um[1],
                    self.z_um,
                )
            )
        return out


class AcquisitionSettings(BaseModel):
    """How each field is taken."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, frozen=True)

    led_current: float = Field(1.0, gt=0.0, le=1.0, description="fraction of rated LED current")
    settle_ms: float = Field(20.0, ge=0.0, le=10_000, description="wait after a move, ms")
    polariser_deg: float | None = Field(
        None, description="polariser angle to set before scanning (needs the capability)"
    )
    capture_timeout_s: float = Field(5.0, gt=0.0, description="per-frame camera timeout")
    home_if_needed: bool = Field(True, description="home the stage first if it is not homed")
    reset_retries: int = Field(1, ge=0, le=5, description="retakes of a field after a reset")


@dataclass
class FieldPair:
    """The W (diffuse) and P (polarized) frames of one field, with how they were taken."""

    index: int
    position: Position
    diffuse: RGBImage
    polarized: RGBImage
    timestamps: dict[str, str] = field(default_factory=dict)
    timings_ms: dict[str, float] = field(default_factory=dict)
    reported_position: Position | None = None
    qc: dict[str, Any] | None = None

    def metadata(self) -> dict[str, Any]:
        """JSON-ready description without the pixels."""
        return {
            "index": self.index,
            "position_um": self.position.as_list(),
            "reported_position_um": (
                self.reported_position.as_list() if self.reported_position else None
            ),
            "shape": list(self.diffuse.shape),
            "timestamps": self.timestamps,
            "timings_ms": self.timings_ms,
            "qc": self.qc,
        }


def utc_now() -> str:
    """The current UTC time as RFC 3339 with milliseconds."""
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class _Timer:
    def __init__(self) -> None:
        self.ms: dict[str, float] = {}

    @contextlib.contextmanager
    def step(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.ms[name] = round((time.perf_counter() - start) * 1000, 3)


class _EventWatch:
    """Counts disruptive controller events, so a field spanning one is not trusted."""

    def __init__(self) -> None:
        self.seen: list[str] = []
        self._lock = threading.Lock()

    def __call__(self, event: ControllerEvent) -> None:
        if event.kind in DISRUPTIVE_EVENTS:
            with self._lock:
                self.seen.append(event.kind)

    def mark(self) -> int:
        with self._lock:
            return len(self.seen)

    def since(self, mark: int) -> list[str]:
        with self._lock:
            return self.seen[mark:]


def lights_off(controller: Controller) -> None:
    """Turn the LEDs off, logging (not raising) if the link cannot do it now."""
    try:
        controller.set_illumination(Illumination.OFF)
    except DeviceResetError:
        # A rebooted firmware boots with its LEDs off; the reset is reported by the next call.
        log.info("LEDs off after a firmware reset")
    except BridgeError as exc:
        log.warning("could not turn the LEDs off: %s", exc)


def halt_stage(controller: Controller) -> None:
    """Stop the stage (not an emergency stop), logging (not raising) if the link cannot now."""
    try:
        controller.stop(emergency=False)
    except BridgeError as exc:
        log.warning("could not stop the stage: %s", exc)


def _prepare(controller: Controller, settings: AcquisitionSettings) -> None:
    lights_off(controller)
    status = controller.status()
    if status.estop:
        raise BridgeOperationError("the controller is in emergency stop; clear it first")
    if not status.homed:
        if not settings.home_if_needed:
            raise BridgeOperationError("the stage is not homed")
        controller.home()
    if settings.polariser_deg is not None:
        controller.set_polariser(settings.polariser_deg)


def _expose(
    controller: Controller,
    camera: Camera,
    mode: Illumination,
    settings: AcquisitionSettings,
) -> tuple[RGBImage, str]:
    controller.set_illumination(mode, settings.led_current)
    camera.flush()
    stamp = utc_now()
    return camera.capture(settings.capture_timeout_s), stamp


def _take_field(
    controller: Controller,
    camera: Camera,
    *,
    index: int,
    pos: Position,
    settings: AcquisitionSettings,
    watch: _EventWatch,
) -> FieldPair:
    timer = _Timer()
    mark = watch.mark()
    started = utc_now()
    try:
        with timer.step("move"):
            controller.move_to(pos)
        with timer.step("settle"):
            time.sleep(settings.settle_ms / 1000)
        with timer.step("diffuse"):
            w, w_at = _expose(controller, camera, Illumination.DIFFUSE, settings)
        with timer.step("polarized"):
            p, p_at = _expose(controller, camera, Illumination.POLARIZED, settings)
        with timer.step("off"):
            controller.set_illumination(Illumination.OFF)
        with timer.step("status"):
            status = controller.status()
    except BaseException:
        # Never leave the stage running or the LEDs on after a failed field: a move that
        # failed other than by its own timeout (a link error while polling, say) may still be
        # under way on the firmware.
        halt_stage(controller)
        lights_off(controller)
        raise
    disrupted = watch.since(mark)
    if "boot" in disrupted:
        raise DeviceResetError(f"field {index}: the firmware rebooted while it was taken")
    if disrupted:
        raise BridgeOperationError(f"field {index}: interrupted by {', '.join(disrupted)}")
    return FieldPair(
        index=index,
        position=pos,
        diffuse=w,
        polarized=p,
        timestamps={"started": started, "diffuse": w_at, "polarized": p_at, "finished": utc_now()},
        timings_ms=timer.ms,
        reported_position=status.position,
    )


def acquire_fields(
    controller: Controller,
    camera: Camera,
    plan: ScanPlan,
    settings: AcquisitionSettings | None = None,
    qc: QualityCheck | None = None,
) -> Iterator[FieldPair]:
    """Take every field of ``plan``; yields each pair as soon as its LEDs are off."""
    settings = settings or AcquisitionSettings()
    watch = _EventWatch()
    controller.add_event_listener(watch)
    try:
        _prepare(controller, settings)
        for index, pos in enumerate(plan.positions()):
            pair = _take_with_retries(
                controller, camera, index=index, pos=pos, settings=settings, watch=watch
            )
            if qc is not None:
                start = time.perf_counter()
                verdict = qc(pair)
                pair.qc = dict(verdict) if verdict is not None else None
                pair.timings_ms["qc"] = round((time.perf_counter() - start) * 1000, 3)
            yield pair
    finally:
        controller.remove_event_listener(watch)
        lights_off(controller)


def _take_with_retries(
    controller: Controller,
    camera: Camera,
    *,
    index: int,
    pos: Position,
    settings: AcquisitionSettings,
    watch: _EventWatch,
) -> FieldPair:
    for attempt in range(settings.reset_retries + 1):
        try:
            return _take_field(
                controller, camera, index=index, pos=pos, settings=settings, watch=watch
            )
        except DeviceResetError as exc:
            if attempt >= settings.reset_retries:
                raise
            # The reboot lost the LEDs, the homing and the position: re-establish, retake.
            log.warning("field %d: %s; homing and retaking it", index, exc)
            with contextlib.suppress(DeviceResetError):
                controller.status()
            _prepare(controller, settings)
    raise BridgeOperationError(f"field {index}: not taken")  # unreachable: loop returns/raises


def prefetched(source: Iterator[FieldPair], depth: int) -> Iterator[FieldPair]:
    """Run ``source`` on a worker thread up to ``depth`` pairs ahead of the consumer.

    The next field is acquired while the caller computes on the current one.  Errors of the
    worker are re-raised in the caller; leaving the loop early stops the worker.
    """
    import queue

    items: queue.Queue[tuple[str, Any]] = queue.Queue(maxsize=max(1, depth))
    stop = threading.Event()

    def put(item: tuple[str, Any]) -> bool:
        while not stop.is_set():
            with contextlib.suppress(queue.Full):
                items.put(item, timeout=0.05)
                return True
        return False

    def work() -> None:
        try:
            for pair in source:
                if not put(("pair", pair)):
                    return
            put(("end", None))
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer thread, re-raised
            put(("error", exc))
        finally:
            close = getattr(source, "close", None)
            if close is not None:
                close()

    worker = threading.Thread(target=work, name="acquisition", daemon=True)
    worker.start()
    try:
        while True:
            kind, value = items.get()
            if kind == "end":
                return
            if kind == "error":
                raise value
            yield value
    finally:
        stop.set()
        worker.join(timeout=30)


def parse_size(text: str) -> tuple[int, int]:
    """``"640x512"`` -> ``(640, 512)``; :class:`InputError` otherwise."""
    parts = text.lower().split("x")
    try:
        width, height = (int(v) for v in parts)
    except ValueError:
        raise InputError(f"size {text!r} is not WIDTHxHEIGHT (e.g. 640x512)") from None
    if not (8 <= width <= 16384 and 8 <= height <= 16384):
        raise InputError(f"size {text!r} is out of range (8..16384 per side)")
    return width, height


def make_plan(**values: Any) -> ScanPlan:
    """Build a :class:`ScanPlan`, turning validation errors into :class:`InputError`."""
    try:
        return ScanPlan(**values)
    except ValidationError as exc:
        raise InputError(f"scan plan: {first_error(exc, 'plan')}") from None
