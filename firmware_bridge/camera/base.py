"""The camera seam, re-exported from :mod:`firmware_bridge.base` beside its implementations."""

from firmware_bridge.base import Camera, CameraSettings, RGBImage

__all__ = ["Camera", "CameraSettings", "RGBImage"]
