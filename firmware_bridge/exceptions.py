"""Errors raised by the firmware bridge, cameras, acquisition and the simulator.

Tree::

    BridgeError
    ├── InputError              bad user or file input (unreadable image, bad URL, bad plan)
    ├── BridgeInitError         a device could not be opened or refused (port missing, bad firmware)
    │   └── UnsupportedFirmwareError
    ├── BridgeOperationError    a command failed on a working link (nack, fault, limit)
    │   ├── EmergencyStopError
    │   ├── SoftLimitError      a move outside the soft limits, refused by host or firmware
    │   └── DeviceResetError    the firmware rebooted (brown-out): its state was lost
    ├── BridgeTimeoutError      no (valid) answer in time, after the bounded retries
    │   └── LinkDownError       the serial port vanished and did not come back in time
    └── ProtocolError           a frame could not be encoded or decoded

Foreign errors (``serial.SerialException``, ``OSError``, ``cv2.error``) are wrapped at the
seam with ``raise ... from``.
"""

from __future__ import annotations


class BridgeError(Exception):
    """Base of every error raised by :mod:`firmware_bridge`."""


class InputError(BridgeError, ValueError):
    """Bad input: the message names the file, key or value at fault."""


class BridgeInitError(BridgeError):
    """A device (serial port, camera, firmware) could not be opened or was refused."""


class UnsupportedFirmwareError(BridgeInitError):
    """The firmware's version or capabilities are not supported by this host."""


class BridgeOperationError(BridgeError):
    """A command was answered with an error, or the device reported a fault."""

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        self.code = code


class EmergencyStopError(BridgeOperationError):
    """The device is in emergency stop; it must be cleared before moving again."""


class BridgeTimeoutError(BridgeError, TimeoutError):
    """No valid answer arrived in time, after the bounded retries."""


class ProtocolError(BridgeError):
    """A frame could not be encoded or decoded."""


class SoftLimitError(BridgeOperationError):
    """A move was refused because the target lies outside the soft travel limits."""


class DeviceResetError(BridgeOperationError):
    """The firmware rebooted since the last command (boot counter changed): state was lost."""


class LinkDownError(BridgeTimeoutError):
    """The serial link is down (port vanished) and did not come back in time."""
