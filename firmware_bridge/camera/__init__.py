"""Cameras behind one seam (:class:`Camera`): OpenCV devices and the synthetic camera."""

from firmware_bridge.camera.base import Camera, CameraSettings
from firmware_bridge.camera.opencv import OpenCVCamera
from firmware_bridge.camera.synthetic import SyntheticCamera

__all__ = ["Camera", "CameraSettings", "OpenCVCamera", "SyntheticCamera"]
