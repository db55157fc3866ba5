"""A camera read through OpenCV: a V4L2 device (index or path) or a GStreamer pipeline.

Automatic exposure, gain and white balance are switched off and fixed, because W and P must
be comparable; where the backend reports a setting back, it is checked, and a refused setting
is an error.  GStreamer pipelines (e.g. Jetson CSI ``nvarguscamerasrc``, see
``docs/firmware-protocol.md``) carry their settings in the pipeline string; OpenCV cannot read
them back, so they are recorded as unverified.  Frames are converted from OpenCV's BGR to RGB
here, at the seam.  ``cv2.VideoCapture.read`` can block forever, so reads run on one worker
thread (started in :meth:`open`) and are waited for with a timeout.
"""

from __future__ import annotations

import concurrent.futures
import logging
from collections.abc import Callable
from typing import Any, TypeVar

import cv2
import numpy as np

from firmware_bridge.base import Camera, CameraSettings, RGBImage
from firmware_bridge.exceptions import BridgeInitError, BridgeOperationError, BridgeTimeoutError

log = logging.getLogger(__name__)

T = TypeVar("T")

BACKENDS: dict[str, int] = {
    "v4l2": cv2.CAP_V4L2,
    "gstreamer": cv2.CAP_GSTREAMER,
    "any": cv2.CAP_ANY,
}
# V4L2 reports exposure in units of 100 µs; "manual" is 1 for raw V4L2 values and 0.25 for
# OpenCV's older normalised convention: both are tried.
V4L2_EXPOSURE_UNIT_MS = 0.1
MANUAL_EXPOSURE_VALUES = (1.0, 0.25)


def _backend_for(source: int | str, backend: str) -> str:
    if backend != "auto":
        return backend
    return "gstreamer" if isinstance(source, str) and "!" in source else "v4l2"


class OpenCVCamera(Camera):
    """A V4L2 or GStreamer camera with fixed exposure, gain and white balance."""

    def __init__(
        self,
        source: int | str,
        *,
        size: tuple[int, int] | None = None,
        exposure_ms: float = 20.0,
        gain: float = 1.0,
        white_balance_k: int = 5500,
        backend: str = "auto",
        flush_frames: int = 3,
        read_timeout_s: float = 2.0,
    ) -> None:
        super().__init__()
        self.source = source
        self.backend = _backend_for(source, backend)
        if self.backend not in BACKENDS:
            raise BridgeInitError(f"unknown camera backend {backend!r}; known: {sorted(BACKENDS)}")
        self.size = size
        self.exposure_ms = exposure_ms
        self.gain = gain
        self.white_balance_k = white_balance_k
        self.flush_frames = flush_frames
        self.read_timeout_s = read_timeout_s
        self._cap: Any = None
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._verified: dict[str, bool] = {}
        self._actual_size: tuple[int, int] = size or (0, 0)

    @property
    def settings(self) -> CameraSettings:
        """Settings asked for, and which of them the backend confirmed."""
        return CameraSettings(
            width=self._actual_size[0],
            height=self._actual_size[1],
            exposure_ms=self.exposure_ms,
            gain=self.gain,
            white_balance_k=self.white_balance_k,
            backend=self.backend,
            source=str(self.source),
            verified=dict(self._verified),
        )

    def _describe(self) -> str:
        return f"camera {self.source!r} (OpenCV {self.backend} backend)"

    def _open(self) -> None:
        cap = cv2.VideoCapture(self.source, BACKENDS[self.backend])
        if not cap.isOpened():
            cap.release()
            raise BridgeInitError(f"cannot open {self._describe()}: no such device or pipeline")
        self._cap = cap
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="camera")
        try:
            if self.backend != "gstreamer":
                self._fix_settings()
            self._check_first_frame()
        except BaseException:
            self._close()
            raise

    def _close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
        if self._cap is not None:
            self._cap.release()
            self._cap = None

    def _fix_settings(self) -> None:
        cap = self._cap
        if self.size is not None:
            cap.set(cv2.CAP_PROP_FRAME_WIDTH, self.size[0])
            cap.set(cv2.CAP_PROP_FRAME_HEIGHT, self.size[1])
        for value in MANUAL_EXPOSURE_VALUES:
            if cap.set(cv2.CAP_PROP_AUTO_EXPOSURE, value):
                break
        cap.set(cv2.CAP_PROP_AUTO_WB, 0)
        cap.set(cv2.CAP_PROP_EXPOSURE, self.exposure_ms / V4L2_EXPOSURE_UNIT_MS)
        cap.set(cv2.CAP_PROP_GAIN, self.gain)
        cap.set(cv2.CAP_PROP_WB_TEMPERATURE, self.white_balance_k)
        self._verify("auto_exposure", cv2.CAP_PROP_AUTO_EXPOSURE, MANUAL_EXPOSURE_VALUES)
        self._verify("auto_white_balance", cv2.CAP_PROP_AUTO_WB, (0.0,))
        self._verify("exposure", cv2.CAP_PROP_EXPOSURE, (self.exposure_ms / V4L2_EXPOSURE_UNIT_MS,))
        self._verify("gain", cv2.CAP_PROP_GAIN, (self.gain,))
        self._verify("white_balance", cv2.CAP_PROP_WB_TEMPERATURE, (float(self.white_balance_k),))

    def _verify(self, name: str, prop: int, accepted: tuple[float, ...]) -> None:
        got = float(self._cap.get(prop))
        # Backends answer 0 or -1 for properties they do not report: nothing to verify then.
        if got == -1.0 or (got == 0.0 and 0.0 not in accepted):
            self._verified[name] = False
            log.info("%s does not report %s; it stays unverified", self._describe(), name)
            return
        if not any(abs(got - want) <= max(1e-3, 0.02 * abs(want)) for want in accepted):
            raise BridgeInitError(
                f"{self._describe()} did not accept {name}: asked {accepted[0]:g}, got {got:g}"
            )
        self._verified[name] = True

    def _check_first_frame(self) -> None:
        frame = self._read()
        height, width = frame.shape[:2]
        if self.size is not None and (width, height) != self.size:
            raise BridgeInitError(
                f"{self._describe()} delivers {width}x{height}, not the "
                f"{self.size[0]}x{self.size[1]} asked for"
            )
        self._actual_size = (width, height)
        self._verified["size"] = True

    def _call(self, fn: Callable[[], T], what: str, timeout_s: float | None = None) -> T:
        if self._pool is None:
            raise BridgeOperationError(f"{self._describe()} is closed")
        limit = self.read_timeout_s if timeout_s is None else timeout_s
        future = self._pool.submit(fn)
        try:
            return future.result(timeout=limit)
        except concurrent.futures.TimeoutError as exc:
            raise BridgeTimeoutError(
                f"{self._describe()}: {what} took more than {limit:g} s"
            ) from exc
        except cv2.error as exc:
            raise BridgeOperationError(f"{self._describe()}: {what} failed: {exc}") from exc

    def _read(self, timeout_s: float | None = None) -> RGBImage:
        ok, frame = self._call(self._cap.read, "read", timeout_s)
        if not ok or frame is None:
            raise BridgeOperationError(f"{self._describe()} returned no frame")
        if frame.ndim != 3 or frame.shape[2] != 3 or frame.dtype != np.uint8:
            raise BridgeOperationError(f"{self._describe()} returned a {frame.dtype} {frame.shape}")
        rgb: RGBImage = cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
        return rgb

    def _capture(self, timeout_s: float | None) -> RGBImage:
        return self._read(timeout_s)

    def _flush(self) -> None:
        # Drivers queue a few buffers exposed before the illumination changed: drop them.
        for _ in range(self.flush_frames):
            if not self._call(self._cap.grab, "grab"):
                raise BridgeOperationError(f"{self._describe()}: grab failed while flushing")
