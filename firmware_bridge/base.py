"""The seams of the microscope: the controller (illumination, polariser, stage) and the camera.

Implementations live beside their seam: :mod:`firmware_bridge.client` (the serial controller,
used for real hardware and for the simulated firmware alike) and :mod:`firmware_bridge.camera`.
"""

from __future__ import annotations

import abc
import enum
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from types import TracebackType
from typing import Any, Protocol, TypeVar, runtime_checkable

import numpy as np
import numpy.typing as npt

from firmware_bridge.exceptions import BridgeInitError, BridgeOperationError

log = logging.getLogger(__name__)

RGBImage = npt.NDArray[np.uint8]
_CamT = TypeVar("_CamT", bound="Camera")


class Illumination(enum.IntEnum):
    """Illumination modes; the value is the wire code, ``str()`` the name used in files."""

    OFF = 0
    DIFFUSE = 1
    POLARIZED = 2

    def __str__(self) -> str:
        return self.name.lower()

    @classmethod
    def parse(cls, value: str | int | Illumination) -> Illumination:
        """Accept ``"diffuse"``, ``2`` or a member; raise ``ValueError`` otherwise."""
        if isinstance(value, str):
            try:
                return cls[value.upper()]
            except KeyError:
                raise ValueError(f"unknown illumination {value!r}") from None
        return cls(value)


@dataclass(frozen=True)
class Position:
    """A stage position in micrometres."""

    x_um: float
    y_um: float
    z_um: float = 0.0

    def as_list(self) -> list[float]:
        """``[x, y, z]`` in micrometres."""
        return [self.x_um, self.y_um, self.z_um]


@dataclass(frozen=True)
class StageLimits:
    """Soft travel limits in micrometres (inclusive)."""

    x_um: tuple[float, float]
    y_um: tuple[float, float]
    z_um: tuple[float, float] = (0.0, 0.0)

    def violation(self, pos: Position) -> str | None:
        """A sentence naming the first axis outside its limits, or ``None``."""
        for axis, value, (lo, hi) in (
            ("x", pos.x_um, self.x_um),
            ("y", pos.y_um, self.y_um),
            ("z", pos.z_um, self.z_um),
        ):
            if not lo <= value <= hi:
                return f"{axis}={value:g} um is outside the soft limits [{lo:g}, {hi:g}] um"
        return None

    def intersect(self, other: StageLimits) -> StageLimits:
        """The tighter of two sets of limits, axis by axis."""

        def both(a: tuple[float, float], b: tuple[float, float]) -> tuple[float, float]:
            return (max(a[0], b[0]), min(a[1], b[1]))

        return StageLimits(
            both(self.x_um, other.x_um), both(self.y_um, other.y_um), both(self.z_um, other.z_um)
        )


@dataclass(frozen=True)
class FirmwareInfo:
    """What the firmware said about itself in the handshake."""

    name: str
    version: tuple[int, int, int]
    protocol_version: int
    capabilities: list[str]
    boot_count: int
    speed_um_s: float
    max_led_ma: int
    watchdog_s: float
    limits: StageLimits

    @property
    def version_str(self) -> str:
        """``major.minor.patch``."""
        return ".".join(str(v) for v in self.version)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form for metadata files."""
        data = asdict(self)
        data["version"] = self.version_str
        return data


@dataclass(frozen=True)
class ControllerStatus:
    """The controller's state as reported by the firmware (never the host's belief)."""

    position: Position
    moving: bool
    homed: bool
    estop: bool
    slide_present: bool
    illumination: Illumination
    led_current: float
    polariser_deg: float
    faults: list[str]
    temperature_c: float
    boot_count: int
    uptime_s: float

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        data = asdict(self)
        data["illumination"] = str(self.illumination)
        return data


@dataclass(frozen=True)
class ControllerEvent:
    """An unsolicited event from the firmware, or a link event raised by the host side.

    ``kind`` is one of: move_done, limit_hit, fault, over_temperature, slide_inserted,
    slide_removed, watchdog, boot, link_down, link_up, reset.
    """

    kind: str
    data: dict[str, Any] = field(default_factory=dict)
    received_at: float = field(default_factory=time.time)


EventCallback = Callable[[ControllerEvent], None]


@runtime_checkable
class Controller(Protocol):
    """Illumination, polariser and stage.  Every call is confirmed by the firmware."""

    @property
    def info(self) -> FirmwareInfo:
        """Firmware identity from the last handshake."""
        ...

    def open(self) -> Controller:
        """Open the link and handshake; idempotent."""
        ...

    def close(self) -> None:
        """Illumination off, stage stopped (when possible), link closed; idempotent."""
        ...

    def status(self) -> ControllerStatus:
        """Ask the firmware for its state."""
        ...

    def set_illumination(self, mode: Illumination, current: float = 1.0) -> None:
        """Switch the LEDs; ``current`` is a fraction of the rated maximum."""
        ...

    def set_polariser(self, angle_deg: float) -> None:
        """Rotate the polariser (needs the POLARISER capability)."""
        ...

    def move_to(self, pos: Position, *, wait: bool = True, timeout_s: float | None = None) -> None:
        """Move the stage to ``pos`` (soft limits checked on both sides)."""
        ...

    def move_by(self, dx_um: float, dy_um: float, dz_um: float = 0.0, *, wait: bool = True) -> None:
        """Move the stage by an offset."""
        ...

    def home(self, *, timeout_s: float | None = None) -> None:
        """Home every axis and wait."""
        ...

    def stop(self, *, emergency: bool = False) -> None:
        """Halt motion; ``emergency`` also turns the LEDs off and latches until cleared."""
        ...

    def clear_fault(self) -> None:
        """Clear latched faults and the e-stop."""
        ...

    def add_event_listener(self, callback: EventCallback) -> None:
        """Call ``callback`` (from the reader thread; keep it short) for every event."""
        ...

    def remove_event_listener(self, callback: EventCallback) -> None:
        """Stop calling ``callback``."""
        ...


@dataclass(frozen=True)
class CameraSettings:
    """Fixed capture settings: W and P must be taken with identical ones."""

    width: int
    height: int
    exposure_ms: float
    gain: float
    white_balance_k: int
    backend: str
    source: str
    verified: dict[str, bool] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return asdict(self)


class Camera(abc.ABC):
    """Template for cameras: the public methods check state and time; subclasses fill in steps."""

    def __init__(self) -> None:
        self._opened = False
        self.last_capture_s = 0.0

    def __enter__(self: _CamT) -> _CamT:
        return self.open()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def is_open(self) -> bool:
        """True between :meth:`open` and :meth:`close`."""
        return self._opened

    def open(self: _CamT) -> _CamT:
        """Open the device and fix its settings; idempotent."""
        if not self._opened:
            self._open()
            self._opened = True
        return self

    def close(self) -> None:
        """Release the device; idempotent."""
        if self._opened:
            self._opened = False
            self._close()

    def capture(self, timeout_s: float | None = None) -> RGBImage:
        """One frame as RGB uint8 H×W×3, taken after the call (never an old buffered one)."""
        if not self._opened:
            raise BridgeInitError(f"{type(self).__name__}: capture() before open()")
        start = time.perf_counter()
        frame = self._capture(timeout_s)
        if frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[2] != 3:
            raise BridgeOperationError(f"camera returned a {frame.dtype} frame of {frame.shape}")
        self.last_capture_s = time.perf_counter() - start
        return frame

    def flush(self) -> None:
        """Drop frames exposed before now (call after every illumination change)."""
        if not self._opened:
            raise BridgeInitError(f"{type(self).__name__}: flush() before open()")
        self._flush()

    @property
    @abc.abstractmethod
    def settings(self) -> CameraSettings:
        """The settings in force."""

    @abc.abstractmethod
    def _open(self) -> None: ...

    @abc.abstractmethod
    def _close(self) -> None: ...

    @abc.abstractmethod
    def _capture(self, timeout_s: float | None) -> RGBImage: ...

    @abc.abstractmethod
    def _flush(self) -> None: ...
