"""A camera that photographs the simulated sample under the simulated hardware's state.

It reads the LED mode, LED current and stage position from the simulated firmware itself
(:meth:`SimulatedFirmware.snapshot`), never from the host: if the host believes the LEDs are
on but the firmware turned them off, the frame is dark, as on the real instrument.  A frame is
delivered ``exposure_ms`` after the capture starts (rendering happens inside that window).
"""

from __future__ import annotations

import time

from firmware_bridge.base import Camera, CameraSettings, RGBImage
from firmware_bridge.exceptions import BridgeTimeoutError
from firmware_bridge.sim.firmware import SimulatedFirmware
from firmware_bridge.sim.sample import SyntheticSlide

NOMINAL_EXPOSURE_MS = 20.0


class SyntheticCamera(Camera):
    """Renders :class:`SyntheticSlide` fields at the simulated stage position and illumination."""

    def __init__(
        self,
        firmware: SimulatedFirmware,
        slide: SyntheticSlide,
        *,
        size: tuple[int, int] = (640, 512),
        exposure_ms: float = NOMINAL_EXPOSURE_MS,
        gain: float = 1.0,
        settle_ms: float = 5.0,
    ) -> None:
        super().__init__()
        self.firmware = firmware
        self.slide = slide
        self.size = size
        self.exposure_ms = exposure_ms
        self.gain = gain
        self.settle_ms = settle_ms
        self.hardware_s = 0.0  # simulated exposure + settle time spent, for the benchmark
        self.render_excess_s = 0.0  # rendering time beyond the exposure (simulator CPU cost)

    @property
    def settings(self) -> CameraSettings:
        """Fixed settings (all honoured by construction, hence verified)."""
        return CameraSettings(
            width=self.size[0],
            height=self.size[1],
            exposure_ms=self.exposure_ms,
            gain=self.gain,
            white_balance_k=5500,
            backend="synthetic",
            source=f"{self.slide.slide_id} ({self.slide.pap_group})",
            verified={"exposure": True, "gain": True, "white_balance": True, "size": True},
        )

    def _open(self) -> None:
        pass

    def _close(self) -> None:
        pass

    def _capture(self, timeout_s: float | None) -> RGBImage:
        exposure_s = self.exposure_ms / 1000
        if timeout_s is not None and timeout_s < exposure_s:
            raise BridgeTimeoutError(
                f"synthetic camera: timeout {timeout_s} s is shorter than the exposure"
            )
        start = time.perf_counter()
        state = self.firmware.snapshot()
        frame = self.slide.render_field(
            state.position.x_um,
            state.position.y_um,
            str(state.illumination),
            size=self.size,
            led_current=state.led_current,
            exposure=self.gain * self.exposure_ms / NOMINAL_EXPOSURE_MS,
        )
        remaining = start + exposure_s - time.perf_counter()
        if remaining > 0:
            time.sleep(remaining)
        else:
            self.render_excess_s -= remaining
        self.hardware_s += exposure_s
        return frame

    def _flush(self) -> None:
        # The LED needs a moment to reach its set current; frames exposed meanwhile are dropped.
        time.sleep(self.settle_ms / 1000)
        self.hardware_s += self.settle_ms / 1000
