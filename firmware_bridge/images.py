"""Reading and writing the RGB field images, with clear errors for anything else.

All images inside this project are ``uint8`` arrays of shape ``(H, W, 3)`` in R, G, B order.
OpenCV's BGR order is converted here, at the file seam, and nowhere else.
"""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np
import numpy.typing as npt

from firmware_bridge.exceptions import InputError
from firmware_bridge.fsutil import atomic_write_bytes

RGBImage = npt.NDArray[np.uint8]


def check_rgb(image: object, name: str = "image") -> RGBImage:
    """Return ``image`` if it is a non-empty uint8 H×W×3 array; else raise :class:`InputError`."""
    if not isinstance(image, np.ndarray):
        raise InputError(f"{name}: expected a numpy array, got {type(image).__name__}")
    if image.dtype != np.uint8:
        raise InputError(f"{name}: expected 8-bit (uint8) data, got {image.dtype}")
    if image.ndim != 3 or image.shape[2] != 3:
        raise InputError(f"{name}: expected an H×W×3 RGB image, got shape {image.shape}")
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise InputError(f"{name}: the image is empty (shape {image.shape})")
    return image


def _quiet_imdecode(data: npt.NDArray[np.uint8]) -> cv2.typing.MatLike | None:
    """``cv2.imdecode`` without OpenCV's own warnings on stderr.

    A truncated file makes the decoder print "[ WARN ] ... buffer is incomplete" on stderr
    before returning None; our error names the file, and the CLI promises one line.
    """
    old = cv2.utils.logging.getLogLevel()
    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)
    try:
        image: cv2.typing.MatLike | None = cv2.imdecode(data, cv2.IMREAD_UNCHANGED)
    finally:
        cv2.utils.logging.setLogLevel(old)
    return image


def read_rgb(path: str | os.PathLike[str]) -> RGBImage:
    """Read an 8-bit RGB image file (PNG, TIFF, JPEG, …) as an H×W×3 uint8 array in RGB order."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{p}: no such file")
    data = np.fromfile(p, dtype=np.uint8)
    if data.size == 0:
        raise InputError(f"{p}: the file is empty")
    image = _quiet_imdecode(data)
    if image is None:
        raise InputError(f"{p}: not a readable image (unknown format or truncated file)")
    if image.dtype != np.uint8:
        raise InputError(f"{p}: expected an 8-bit image, got {image.dtype} (16-bit is unsupported)")
    if image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 1):
        raise InputError(f"{p}: expected an RGB image, got a grayscale one")
    if image.ndim != 3 or image.shape[2] not in (3, 4):
        raise InputError(f"{p}: expected an RGB image, got shape {image.shape}")
    if image.shape[2] == 4:
        raise InputError(f"{p}: expected an RGB image, got one with an alpha channel")
    rgb = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    return check_rgb(rgb, str(p))


def encode_png(image: RGBImage, compression: int = 3) -> bytes:
    """Encode an RGB uint8 image as PNG bytes (deterministic for the same pixels)."""
    check_rgb(image)
    ok, buf = cv2.imencode(
        ".png", cv2.cvtColor(image, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_PNG_COMPRESSION, compression]
    )
    if not ok:
        raise InputError("PNG encoding failed")
    return bytes(buf.tobytes())


def write_png(path: str | os.PathLike[str], image: RGBImage, compression: int = 3) -> Path:
    """Write an RGB uint8 image as PNG, atomically."""
    return atomic_write_bytes(path, encode_png(image, compression))
