"""Reading and writing the RGB field images, with clear errors for anything else.

All images inside this project are ``uint8`` arrays of shape ``(H, W, 3)`` in R, G, B order.
OpenCV's BGR order is converted here, at the file seam, and nowhere else.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import tempfile
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import numpy.typing as npt
from PIL import Image, UnidentifiedImageError

from firmware_bridge.exceptions import InputError
from firmware_bridge.fsutil import atomic_write_bytes

log = logging.getLogger(__name__)

RGBImage = npt.NDArray[np.uint8]

# Documented in docs/security.md: a field image is a few MP; 50 MP bounds memory at ~150 MB
# per decoded image.  Checked from the header, before anything is decoded.
MAX_IMAGE_PIXELS = 50_000_000
MAX_IMAGE_BYTES = 256 * 1024 * 1024
_STDERR_LOCK = threading.Lock()


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


def image_dimensions(data: bytes, name: str = "image") -> tuple[int, int]:
    """Width and height declared by an image header, read without decoding any pixel.

    Raises :class:`InputError` for an unknown format or a header declaring more than
    :data:`MAX_IMAGE_PIXELS` pixels (a few bytes can declare gigabytes of pixels).
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                width, height = im.size
    except Image.DecompressionBombError:
        raise InputError(
            f"{name}: the image declares too many pixels (limit {MAX_IMAGE_PIXELS:,})"
        ) from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise InputError(f"{name}: not a readable image ({exc})") from exc
    if width <= 0 or height <= 0:
        raise InputError(f"{name}: the image header declares an empty image ({width}x{height})")
    if width * height > MAX_IMAGE_PIXELS:
        raise InputError(
            f"{name}: the image declares {width}x{height} pixels, more than the limit of "
            f"{MAX_IMAGE_PIXELS:,}"
        )
    return width, height


@contextlib.contextmanager
def _captured_stderr() -> Iterator[list[str]]:
    """Capture what C libraries (libpng, libjpeg, libtiff) write to file descriptor 2.

    The yielded list receives the captured lines afterwards.  The caller decides: decoder
    messages go into the one-line error, or to the debug log when the decode worked.
    """
    lines: list[str] = []
    with _STDERR_LOCK, tempfile.TemporaryFile() as sink:
        saved = os.dup(2)
        try:
            os.dup2(sink.fileno(), 2)
            yield lines
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            text = sink.read().decode("utf-8", "replace")
            lines.extend(line.strip() for line in text.splitlines() if line.strip())


def _quiet_imdecode(data: npt.NDArray[np.uint8], name: str) -> cv2.typing.MatLike:
    """``cv2.imdecode`` whose decoder messages end up in the error, never on stderr.

    A truncated file makes libpng print "libpng error: ..." and OpenCV "[ WARN ] ..." on
    stderr before returning None; the CLI promises one line naming the file.
    """
    old = cv2.utils.logging.getLogLevel()
    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)
    image: cv2.typing.MatLike | None = None
    failure = ""
    try:
        with _captured_stderr() as messages:
            try:
                image = cv2.imdecode(data, cv2.IMREAD_UNCHANGED)
            except cv2.error as exc:
                failure = str(exc).strip().splitlines()[-1]
    finally:
        cv2.utils.logging.setLogLevel(old)
    if image is None:
        detail = "; ".join([*messages, failure] if failure else messages)
        raise InputError(
            f"{name}: not a readable image (unknown format or truncated file"
            + (f": {detail[:300]})" if detail else ")")
        )
    if messages:  # warnings of a decode that worked (e.g. a bad CRC on IEND): not for users
        log.debug("%s: decoder said: %s", name, "; ".join(messages)[:500])
    return image


def read_rgb(path: str | os.PathLike[str]) -> RGBImage:
    """Read an 8-bit RGB image file (PNG, TIFF, JPEG, …) as an H×W×3 uint8 array in RGB order."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{p}: no such file")
    size = p.stat().st_size
    if size == 0:
        raise InputError(f"{p}: the file is empty")
    if size > MAX_IMAGE_BYTES:
        raise InputError(f"{p}: {size:,} bytes, more than the limit of {MAX_IMAGE_BYTES:,}")
    raw = p.read_bytes()
    image_dimensions(raw, str(p))
    image = _quiet_imdecode(np.frombuffer(raw, dtype=np.uint8), str(p))
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
