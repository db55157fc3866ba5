"""Microscope URLs -> a microscope (controller + camera) ready to acquire field pairs.

``open_microscope(url)`` understands:

* ``sim://[?seed=S&slide=ID&group=II&index=N&fault=drop:0.05,corrupt:0.05,delay:0.01
  &speed=UM_S&exposure_ms=MS&settle_ms=MS&watchdog_s=S]`` -- the simulated firmware on a pty,
  driven by the same :class:`SerialController` as real hardware, and the synthetic camera.
* ``serial:///dev/ttyACM0[?baud=115200&camera=0&camera_backend=auto&exposure_ms=20&gain=1
  &wb=5500]`` -- real hardware: the controller on that port and an :class:`OpenCVCamera`
  (``camera`` is a V4L2 index or path, or a URL-encoded GStreamer pipeline).
* ``replay://DIR[?slide=ID]`` -- a directory written by ``omis acquire`` or
  ``omis dataset synth`` (see :mod:`firmware_bridge.replay`).

Nothing falls back silently: a missing port or camera is an error naming what was tried.
The :class:`~firmware_bridge.microscope_base.Microscope` base they all implement lives in its own
module, so that implementations (``replay.py``) never import this opener module.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, unquote, urlsplit

from firmware_bridge.acquisition import (
    AcquisitionSettings,
    FieldPair,
    QualityCheck,
    ScanPlan,
    acquire_fields,
)
from firmware_bridge.base import Camera
from firmware_bridge.client import ClientConfig, SerialController
from firmware_bridge.exceptions import InputError
from firmware_bridge.limits import check_identifier
from firmware_bridge.microscope_base import Microscope

if TYPE_CHECKING:
    from firmware_bridge.camera.synthetic import SyntheticCamera
    from firmware_bridge.sim.firmware import SimulatedFirmware
    from firmware_bridge.sim.sample import SyntheticSlide

log = logging.getLogger(__name__)

DEFAULT_SIM_SIZE = (640, 512)


class HardwareMicroscope(Microscope):
    """A controller and a camera (real, or the simulated firmware with the synthetic camera)."""

    def __init__(
        self,
        url: str,
        controller: SerialController,
        camera: Camera,
        *,
        kind: str,
        extra: dict[str, Any] | None = None,
        on_close: Callable[[], None] | None = None,
    ) -> None:
        super().__init__(url)
        self.controller = controller
        self.camera = camera
        self.kind = kind
        self.extra = extra or {}
        self._on_close = on_close

    def describe(self) -> dict[str, Any]:
        """Kind, URL, firmware identity, camera settings and any simulation details."""
        return {
            "kind": self.kind,
            "url": self.url,
            "firmware": self.controller.info.to_dict(),
            "camera": self.camera.settings.to_dict(),
            **self.extra,
        }

    def _acquire(
        self, plan: ScanPlan, settings: AcquisitionSettings, qc: QualityCheck | None
    ) -> Iterator[FieldPair]:
        return acquire_fields(self.controller, self.camera, plan, settings, qc)

    def _close(self) -> None:
        try:
            self.camera.close()
        finally:
            try:
                self.controller.close()
            finally:
                if self._on_close is not None:
                    self._on_close()


class SimMicroscope(HardwareMicroscope):
    """The simulated microscope; slides can be swapped like on the real instrument."""

    def __init__(
        self,
        url: str,
        controller: SerialController,
        camera: SyntheticCamera,
        firmware: SimulatedFirmware,
        extra: dict[str, Any],
    ) -> None:
        super().__init__(url, controller, camera, kind="sim", extra=extra, on_close=firmware.close)
        self.firmware = firmware
        self.synthetic_camera = camera

    def load_slide(self, slide: SyntheticSlide) -> None:
        """Put another :class:`SyntheticSlide` under the objective (fires "slide inserted")."""
        self.synthetic_camera.slide = slide
        self.extra["simulation"].update(
            slide_id=slide.slide_id, pap_group=slide.pap_group, slide_seed=slide.seed
        )
        self.firmware.insert_slide(True)


# ---------------------------------------------------------------------------------------------
# URL parsing


def _query(url: str, allowed: set[str]) -> dict[str, str]:
    parts = urlsplit(url)
    query = parse_qs(parts.query, keep_blank_values=True)
    unknown = sorted(set(query) - allowed)
    if unknown:
        raise InputError(f"{url}: unknown option(s) {unknown}; known: {sorted(allowed)}")
    return {k: v[-1] for k, v in query.items()}


def _number(url: str, opts: dict[str, str], key: str, default: float) -> float:
    if key not in opts:
        return default
    try:
        return float(opts[key])
    except ValueError:
        raise InputError(f"{url}: {key}={opts[key]!r} is not a number") from None


def _parse_faults(url: str, text: str) -> dict[str, float]:
    faults: dict[str, float] = {}
    for item in filter(None, text.split(",")):
        name, _, value = item.partition(":")
        if name not in ("drop", "corrupt", "delay"):
            raise InputError(f"{url}: unknown fault {name!r}; known: drop, corrupt, delay")
        try:
            faults[name] = float(value)
        except ValueError:
            raise InputError(f"{url}: fault {item!r} needs a number, e.g. drop:0.05") from None
    return faults


_SIM_OPTIONS = {
    "seed",
    "slide",
    "group",
    "index",
    "fault",
    "speed",
    "exposure_ms",
    "settle_ms",
    "watchdog_s",
}


def _sim_slide(url: str, opts: dict[str, str]) -> Any:
    from firmware_bridge.sim.sample import SyntheticSlide, slide_for
    from firmware_bridge.sim.slides import slide_by_id

    seed = int(_number(url, opts, "seed", 0))
    slide_id, group = opts.get("slide"), opts.get("group")
    if slide_id is not None:
        check_identifier(slide_id, f"{url}: slide")
        return slide_by_id(slide_id, seed, group)
    if group is not None:
        return SyntheticSlide(f"sim{seed}-{group}", group, seed)
    return slide_for(int(_number(url, opts, "index", 0)), seed)


def _open_sim(url: str, size: tuple[int, int] | None) -> Microscope:
    from firmware_bridge.camera.synthetic import SyntheticCamera
    from firmware_bridge.sim.firmware import SimConfig, SimulatedFirmware

    opts = _query(url, _SIM_OPTIONS)
    faults = _parse_faults(url, opts.get("fault", ""))
    slide = _sim_slide(url, opts)
    config = SimConfig(
        speed_um_s=_number(url, opts, "speed", SimConfig.speed_um_s),
        watchdog_s=_number(url, opts, "watchdog_s", SimConfig.watchdog_s),
        drop_rate=faults.get("drop", 0.0),
        corrupt_rate=faults.get("corrupt", 0.0),
        delay_s=faults.get("delay", 0.0),
        seed=int(_number(url, opts, "seed", 0)),
    )
    # Every option is parsed before the firmware starts: a bad one must not leak its pty.
    exposure_ms = _number(url, opts, "exposure_ms", 20.0)
    settle_ms = _number(url, opts, "settle_ms", 5.0)
    firmware = SimulatedFirmware(config).start()
    try:
        camera = SyntheticCamera(
            firmware,
            slide,
            size=size or DEFAULT_SIM_SIZE,
            exposure_ms=exposure_ms,
            settle_ms=settle_ms,
        )
    except BaseException:
        firmware.close()
        raise
    extra = {
        "simulation": {
            "slide_id": slide.slide_id,
            "pap_group": slide.pap_group,
            "slide_seed": slide.seed,
            "faults": faults,
        }
    }
    controller = _open_parts(firmware.port, camera, firmware.close, None)
    return SimMicroscope(url, controller, camera, firmware, extra)


def _open_serial(url: str, size: tuple[int, int] | None) -> Microscope:
    from firmware_bridge.camera.opencv import OpenCVCamera

    opts = _query(url, {"baud", "camera", "camera_backend", "exposure_ms", "gain", "wb"})
    port = unquote(urlsplit(url).path)
    if not port:
        raise InputError(f"{url}: no port; use serial:///dev/ttyACM0")
    source_text = opts.get("camera", "0")
    source: int | str = int(source_text) if source_text.isdigit() else source_text
    camera = OpenCVCamera(
        source,
        size=size,
        exposure_ms=_number(url, opts, "exposure_ms", 20.0),
        gain=_number(url, opts, "gain", 1.0),
        white_balance_k=int(_number(url, opts, "wb", 5500)),
        backend=opts.get("camera_backend", "auto"),
    )
    baud = int(_number(url, opts, "baud", 115_200))
    controller = _open_parts(port, camera, None, ClientConfig(baudrate=baud))
    return HardwareMicroscope(url, controller, camera, kind="serial")


def _open_parts(
    port: str,
    camera: Camera,
    on_close: Callable[[], None] | None,
    config: ClientConfig | None,
) -> SerialController:
    controller = SerialController(port, config)
    try:
        controller.open()
        camera.open()
    except BaseException:
        with contextlib.ExitStack() as stack:
            if on_close is not None:
                stack.callback(on_close)
            stack.callback(controller.close)
        raise
    return controller


def _open_replay(url: str, size: tuple[int, int] | None) -> Microscope:
    from firmware_bridge.replay import ReplayMicroscope

    opts = _query(url, {"slide"})
    parts = urlsplit(url)
    path = unquote(parts.netloc + parts.path)
    return ReplayMicroscope.from_dir(url, path, slide=opts.get("slide"))


_OPENERS: dict[str, Callable[[str, tuple[int, int] | None], Microscope]] = {
    "sim": _open_sim,
    "serial": _open_serial,
    "replay": _open_replay,
}


def open_microscope(url: str, *, size: tuple[int, int] | None = None) -> Microscope:
    """Open the microscope named by ``url``; use the result as a context manager.

    ``size`` is the camera frame size (width, height); ``None`` keeps the device's default.
    """
    scheme = urlsplit(url).scheme
    opener = _OPENERS.get(scheme)
    if opener is None:
        raise InputError(
            f"microscope URL {url!r}: unknown scheme {scheme!r}; use sim://, serial:///dev/… "
            "or replay://DIR"
        )
    return opener(url, size)
