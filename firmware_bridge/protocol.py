"""The framed binary protocol between the host and the microscope controller (pure, no I/O).

Wire format (see ``docs/firmware-protocol.md`` for the full specification)::

    0x00 | COBS( LEN | SEQ | TYPE | PAYLOAD[LEN] | CRC16_hi | CRC16_lo ) | 0x00

``CRC16`` is CRC-16/CCITT-FALSE (poly 0x1021, init 0xFFFF; ``binascii.crc_hqx(data, 0xFFFF)``)
over ``LEN .. PAYLOAD``.  COBS removes every 0x00 from the frame, so 0x00 only ever delimits
frames: a receiver resynchronises at the next 0x00 whatever garbage it saw.

:class:`FrameDecoder` is incremental and never raises on bad bytes; it counts what it dropped.
Messages are frozen dataclasses, one per message type, looked up in :data:`MESSAGE_TYPES`.
"""

from __future__ import annotations

import binascii
import dataclasses
import enum
import struct
from dataclasses import dataclass, field
from typing import ClassVar, TypeVar

from firmware_bridge.exceptions import ProtocolError

PROTOCOL_VERSION = 1
_MsgT = TypeVar("_MsgT", bound="Message")
DELIMITER = 0x00
HEADER_SIZE = 3  # LEN, SEQ, TYPE
CRC_SIZE = 2
MAX_PAYLOAD = 200
MAX_BODY = HEADER_SIZE + MAX_PAYLOAD + CRC_SIZE
# COBS adds one byte per 254 bytes of data plus one: a body of 205 bytes encodes to 207.
MAX_ENCODED = MAX_BODY + MAX_BODY // 254 + 1
MAX_TEXT = 64  # NACK detail and firmware name, in bytes of ASCII

NM_PER_UM = 1000
PERMILLE = 1000
MDEG_PER_DEG = 1000


class MsgType(enum.IntEnum):
    """Message type byte.  0x01-0x3F requests, 0x80-0xBF responses, 0xC0-0xFF events."""

    HELLO = 0x01
    HEARTBEAT = 0x02
    GET_STATUS = 0x03
    SET_ILLUMINATION = 0x10
    SET_POLARISER = 0x11
    MOVE_ABS = 0x20
    MOVE_REL = 0x21
    HOME = 0x22
    STOP = 0x23
    CLEAR_FAULT = 0x24
    ACK = 0x80
    NACK = 0x81
    HELLO_REPLY = 0x82
    STATUS_REPLY = 0x83
    MOVE_DONE = 0xC0
    LIMIT_HIT = 0xC1
    FAULT = 0xC2
    OVER_TEMPERATURE = 0xC3
    SLIDE = 0xC4
    WATCHDOG = 0xC5
    BOOT = 0xC6


class ErrorCode(enum.IntEnum):
    """NACK error codes."""

    UNKNOWN_TYPE = 0x01
    BAD_PAYLOAD = 0x02
    OUT_OF_LIMITS = 0x03
    ESTOP_ACTIVE = 0x04
    FAULT_ACTIVE = 0x05
    BUSY = 0x06
    UNSUPPORTED = 0x07
    NOT_HOMED = 0x08
    NO_SESSION = 0x09
    PROTOCOL_VERSION = 0x0A
    INTERNAL = 0xFF


class Capability(enum.IntFlag):
    """Capability bits announced in HELLO_REPLY."""

    ILLUM_DIFFUSE = 1 << 0
    ILLUM_POLARIZED = 1 << 1
    POLARISER = 1 << 2
    STAGE_XY = 1 << 3
    STAGE_Z = 1 << 4
    HOMING = 1 << 5
    TEMPERATURE = 1 << 6
    SLIDE_SENSOR = 1 << 7


class Fault(enum.IntFlag):
    """Latched fault bits (STATUS_REPLY.faults, FAULT events, CLEAR_FAULT mask)."""

    OVER_TEMPERATURE = 1 << 0
    LIMIT_SWITCH = 1 << 1
    STAGE_STALL = 1 << 2
    LED_DRIVER = 1 << 3


class MoveResult(enum.IntEnum):
    """How a move ended (MOVE_DONE.result)."""

    OK = 0
    HALTED = 1
    LIMIT = 2
    FAULT = 3
    ESTOP = 4


class ResetCause(enum.IntEnum):
    """Why the firmware (re)booted (BOOT.cause)."""

    POWER_ON = 0
    BROWN_OUT = 1
    WATCHDOG = 2
    SOFTWARE = 3


STATUS_MOVING = 1 << 0
STATUS_HOMED = 1 << 1
STATUS_ESTOP = 1 << 2
STATUS_SLIDE = 1 << 3
STOP_EMERGENCY = 1 << 0
AXIS_ALL = 0b111


# ---------------------------------------------------------------------------------------------
# CRC and COBS


def crc16(data: bytes) -> int:
    """CRC-16/CCITT-FALSE of ``data`` (check value of b"123456789" is 0x29B1)."""
    return binascii.crc_hqx(data, 0xFFFF)


def cobs_encode(data: bytes) -> bytes:
    """Consistent Overhead Byte Stuffing: the result contains no 0x00 byte."""
    out = bytearray()
    block = bytearray()
    for byte in data:
        if byte == 0:
            out.append(len(block) + 1)
            out += block
            block.clear()
            continue
        block.append(byte)
        if len(block) == 254:
            out.append(255)
            out += block
            block.clear()
    out.append(len(block) + 1)
    out += block
    return bytes(out)


def cobs_decode(data: bytes) -> bytes:
    """Invert :func:`cobs_encode`; raise :class:`ProtocolError` on malformed input."""
    out = bytearray()
    i = 0
    n = len(data)
    while i < n:
        code = data[i]
        if code == 0:
            raise ProtocolError("COBS: zero byte inside a frame")
        end = i + code
        if end > n:
            raise ProtocolError("COBS: block runs past the end of the frame")
        block = data[i + 1 : end]
        if 0 in block:
            raise ProtocolError("COBS: zero byte inside a block")
        out += block
        i = end
        if code != 255 and i < n:
            out.append(0)
    return bytes(out)


# ---------------------------------------------------------------------------------------------
# Frames


@dataclass(frozen=True)
class Frame:
    """One checked frame: sequence number, message type byte and raw payload."""

    seq: int
    type: int
    payload: bytes


def encode_frame(seq: int, msg_type: int, payload: bytes = b"") -> bytes:
    """Frame ``payload`` for the wire, delimiters included."""
    if not 0 <= seq <= 255:
        raise ProtocolError(f"sequence number {seq} is not a byte")
    if not 0 <= msg_type <= 255:
        raise ProtocolError(f"message type {msg_type} is not a byte")
    if len(payload) > MAX_PAYLOAD:
        raise ProtocolError(f"payload of {len(payload)} bytes exceeds {MAX_PAYLOAD}")
    body = bytes((len(payload), seq, msg_type)) + payload
    body += crc16(body).to_bytes(2, "big")
    return b"\x00" + cobs_encode(body) + b"\x00"


@dataclass
class DecoderStats:
    """What the decoder accepted and what it dropped (counters only grow)."""

    frames: int = 0
    bad_cobs: int = 0
    bad_length: int = 0
    bad_crc: int = 0
    overflow: int = 0
    bytes_dropped: int = 0

    @property
    def errors(self) -> int:
        """Frames dropped for any reason."""
        return self.bad_cobs + self.bad_length + self.bad_crc + self.overflow


class FrameDecoder:
    """Incremental frame decoder: feed it any bytes, get the valid frames out.

    It never raises on bad input.  A run of bytes longer than the largest legal frame is
    dropped (counted as ``overflow``) up to the next delimiter, so memory stays bounded.
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        self._discarding = False
        self.stats = DecoderStats()

    def reset(self) -> None:
        """Forget any partial frame (after a reconnect); counters are kept."""
        self._buf.clear()
        self._discarding = False

    def feed(self, data: bytes) -> list[Frame]:
        """Consume ``data``; return the frames completed by it, in order."""
        frames: list[Frame] = []
        start = 0
        while start <= len(data):
            end = data.find(DELIMITER, start)
            chunk = data[start:] if end < 0 else data[start:end]
            self._append(chunk)
            if end < 0:
                break
            frame = self._finish()
            if frame is not None:
                frames.append(frame)
            start = end + 1
        return frames

    def _append(self, chunk: bytes) -> None:
        if self._discarding:
            self.stats.bytes_dropped += len(chunk)
            return
        self._buf += chunk
        if len(self._buf) > MAX_ENCODED:
            self.stats.overflow += 1
            self.stats.bytes_dropped += len(self._buf)
            self._buf.clear()
            self._discarding = True

    def _finish(self) -> Frame | None:
        if self._discarding:
            self._discarding = False
            return None
        raw = bytes(self._buf)
        self._buf.clear()
        if not raw:  # idle delimiter between frames
            return None
        frame = self._check(raw)
        if frame is None:
            self.stats.bytes_dropped += len(raw)
        else:
            self.stats.frames += 1
        return frame

    def _check(self, raw: bytes) -> Frame | None:
        try:
            body = cobs_decode(raw)
        except ProtocolError:
            self.stats.bad_cobs += 1
            return None
        if len(body) < HEADER_SIZE + CRC_SIZE or body[0] != len(body) - HEADER_SIZE - CRC_SIZE:
            self.stats.bad_length += 1
            return None
        if crc16(body[:-CRC_SIZE]) != int.from_bytes(body[-CRC_SIZE:], "big"):
            self.stats.bad_crc += 1
            return None
        return Frame(seq=body[1], type=body[2], payload=body[HEADER_SIZE:-CRC_SIZE])


# ---------------------------------------------------------------------------------------------
# Messages


@dataclass(frozen=True)
class Message:
    """Base of every message: fixed fields packed with ``_FORMAT`` (little-endian)."""

    TYPE: ClassVar[MsgType]
    _FORMAT: ClassVar[str] = "<"

    def to_payload(self) -> bytes:
        """The payload bytes of this message."""
        values = [getattr(self, f.name) for f in dataclasses.fields(self)]
        try:
            return struct.pack(self._FORMAT, *values)
        except struct.error as exc:
            raise ProtocolError(f"{self.TYPE.name}: cannot pack {values}: {exc}") from exc

    @classmethod
    def from_payload(cls: type[_MsgT], payload: bytes) -> _MsgT:
        """Parse a payload; raise :class:`ProtocolError` if it does not fit."""
        try:
            values = struct.unpack(cls._FORMAT, payload)
        except struct.error as exc:
            raise ProtocolError(f"{cls.TYPE.name}: bad payload of {len(payload)} bytes") from exc
        return cls(*values)

    def encode(self, seq: int) -> bytes:
        """The framed message, ready for the wire."""
        return encode_frame(seq, int(self.TYPE), self.to_payload())


class _TextTail(Message):
    """A message whose fixed fields are followed by an ASCII text (the last field)."""

    def to_payload(self) -> bytes:
        fields = dataclasses.fields(self)
        head = [getattr(self, f.name) for f in fields[:-1]]
        text = str(getattr(self, fields[-1].name)).encode("ascii", "replace")[:MAX_TEXT]
        try:
            return struct.pack(self._FORMAT, *head) + text
        except struct.error as exc:
            raise ProtocolError(f"{self.TYPE.name}: cannot pack {head}: {exc}") from exc

    @classmethod
    def from_payload(cls: type[_MsgT], payload: bytes) -> _MsgT:
        size = struct.calcsize(cls._FORMAT)
        tail = payload[size:]
        if len(payload) < size or len(tail) > MAX_TEXT:
            raise ProtocolError(f"{cls.TYPE.name}: bad payload of {len(payload)} bytes")
        head = struct.unpack(cls._FORMAT, payload[:size])
        names = [f.name for f in dataclasses.fields(cls)]
        values = [*head, tail.decode("ascii", "replace")]
        return cls(**dict(zip(names, values, strict=True)))


@dataclass(frozen=True)
class Hello(Message):
    """Open a session; the host names the highest protocol version it speaks."""

    TYPE = MsgType.HELLO
    _FORMAT = "<B"
    host_protocol: int = PROTOCOL_VERSION


@dataclass(frozen=True)
class Heartbeat(Message):
    """Keep the firmware watchdog fed."""

    TYPE = MsgType.HEARTBEAT


@dataclass(frozen=True)
class GetStatus(Message):
    """Ask for a STATUS_REPLY."""

    TYPE = MsgType.GET_STATUS


@dataclass(frozen=True)
class SetIllumination(Message):
    """Illumination mode (0 off, 1 diffuse, 2 polarized) and LED current in per-mille."""

    TYPE = MsgType.SET_ILLUMINATION
    _FORMAT = "<BH"
    mode: int = 0
    current_permille: int = 0


@dataclass(frozen=True)
class SetPolariser(Message):
    """Polariser angle in millidegrees, 0 <= angle < 360000."""

    TYPE = MsgType.SET_POLARISER
    _FORMAT = "<I"
    angle_mdeg: int = 0


@dataclass(frozen=True)
class MoveAbs(Message):
    """Move the stage to an absolute position (nanometres)."""

    TYPE = MsgType.MOVE_ABS
    _FORMAT = "<iii"
    x_nm: int = 0
    y_nm: int = 0
    z_nm: int = 0


@dataclass(frozen=True)
class MoveRel(Message):
    """Move the stage by an offset (nanometres)."""

    TYPE = MsgType.MOVE_REL
    _FORMAT = "<iii"
    dx_nm: int = 0
    dy_nm: int = 0
    dz_nm: int = 0


@dataclass(frozen=True)
class Home(Message):
    """Home the axes in ``axes`` (bit 0 x, bit 1 y, bit 2 z)."""

    TYPE = MsgType.HOME
    _FORMAT = "<B"
    axes: int = AXIS_ALL


@dataclass(frozen=True)
class Stop(Message):
    """Halt motion; with ``STOP_EMERGENCY`` also LEDs off and latch the e-stop."""

    TYPE = MsgType.STOP
    _FORMAT = "<B"
    flags: int = 0


@dataclass(frozen=True)
class ClearFault(Message):
    """Clear latched faults (and the e-stop) named in ``mask``."""

    TYPE = MsgType.CLEAR_FAULT
    _FORMAT = "<H"
    mask: int = 0xFFFF


@dataclass(frozen=True)
class Ack(Message):
    """The request of the same sequence number was accepted."""

    TYPE = MsgType.ACK
    _FORMAT = "<B"
    request_type: int = 0


@dataclass(frozen=True)
class Nack(_TextTail):
    """The request of the same sequence number was refused, with a code and a detail."""

    TYPE = MsgType.NACK
    _FORMAT = "<BB"
    request_type: int = 0
    code: int = 0
    detail: str = ""


@dataclass(frozen=True)
class HelloReply(_TextTail):
    """Firmware identity, capabilities, limits and timing; ends with the firmware name."""

    TYPE = MsgType.HELLO_REPLY
    _FORMAT = "<BBBBIIIHHiiiiii"
    protocol_version: int = PROTOCOL_VERSION
    fw_major: int = 0
    fw_minor: int = 0
    fw_patch: int = 0
    capabilities: int = 0
    boot_count: int = 0
    speed_um_s: int = 0
    max_led_ma: int = 0
    watchdog_ms: int = 0
    x_min_nm: int = 0
    x_max_nm: int = 0
    y_min_nm: int = 0
    y_max_nm: int = 0
    z_min_nm: int = 0
    z_max_nm: int = 0
    name: str = ""


@dataclass(frozen=True)
class StatusReply(Message):
    """The firmware's state."""

    TYPE = MsgType.STATUS_REPLY
    _FORMAT = "<iiiBBHIHhII"
    x_nm: int = 0
    y_nm: int = 0
    z_nm: int = 0
    flags: int = 0
    illumination: int = 0
    led_permille: int = 0
    polariser_mdeg: int = 0
    faults: int = 0
    temperature_dc: int = 0
    boot_count: int = 0
    uptime_ms: int = 0


@dataclass(frozen=True)
class MoveDone(Message):
    """Event: the move started by request ``request_seq`` ended."""

    TYPE = MsgType.MOVE_DONE
    _FORMAT = "<BBiii"
    request_seq: int = 0
    result: int = 0
    x_nm: int = 0
    y_nm: int = 0
    z_nm: int = 0


@dataclass(frozen=True)
class LimitHit(Message):
    """Event: a limit switch tripped on ``axis`` (0 x, 1 y, 2 z)."""

    TYPE = MsgType.LIMIT_HIT
    _FORMAT = "<Bi"
    axis: int = 0
    position_nm: int = 0


@dataclass(frozen=True)
class FaultEvent(Message):
    """Event: the fault mask changed; ``new`` are the bits just raised."""

    TYPE = MsgType.FAULT
    _FORMAT = "<HH"
    faults: int = 0
    new: int = 0


@dataclass(frozen=True)
class OverTemperature(Message):
    """Event: the LED/driver temperature crossed its limit (deci-degrees Celsius)."""

    TYPE = MsgType.OVER_TEMPERATURE
    _FORMAT = "<h"
    temperature_dc: int = 0


@dataclass(frozen=True)
class SlideEvent(Message):
    """Event: a slide was inserted (1) or removed (0)."""

    TYPE = MsgType.SLIDE
    _FORMAT = "<B"
    present: int = 0


@dataclass(frozen=True)
class WatchdogEvent(Message):
    """Event: the host went silent; illumination is off and motion halted."""

    TYPE = MsgType.WATCHDOG


@dataclass(frozen=True)
class BootEvent(Message):
    """Event: the firmware (re)booted; every state was lost and a new HELLO is needed."""

    TYPE = MsgType.BOOT
    _FORMAT = "<IB"
    boot_count: int = 0
    cause: int = 0


MESSAGE_TYPES: dict[int, type[Message]] = {
    int(cls.TYPE): cls
    for cls in (
        Hello,
        Heartbeat,
        GetStatus,
        SetIllumination,
        SetPolariser,
        MoveAbs,
        MoveRel,
        Home,
        Stop,
        ClearFault,
        Ack,
        Nack,
        HelloReply,
        StatusReply,
        MoveDone,
        LimitHit,
        FaultEvent,
        OverTemperature,
        SlideEvent,
        WatchdogEvent,
        BootEvent,
    )
}


def is_request(msg_type: int) -> bool:
    """True for host-to-firmware request types."""
    return 0x01 <= msg_type <= 0x3F


def is_response(msg_type: int) -> bool:
    """True for responses (they carry the sequence number of the request they answer)."""
    return 0x80 <= msg_type <= 0xBF


def is_event(msg_type: int) -> bool:
    """True for unsolicited events (their sequence numbers count events, not requests)."""
    return msg_type >= 0xC0


def decode_message(frame: Frame) -> Message:
    """The message in a checked frame; :class:`ProtocolError` for unknown types or payloads."""
    cls = MESSAGE_TYPES.get(frame.type)
    if cls is None:
        raise ProtocolError(f"unknown message type 0x{frame.type:02x}")
    return cls.from_payload(frame.payload)


@dataclass
class MessageDecoder:
    """:class:`FrameDecoder` plus message parsing: yields ``(seq, message)`` pairs, never raises."""

    frames: FrameDecoder = field(default_factory=FrameDecoder)
    bad_messages: int = 0

    def feed(self, data: bytes) -> list[tuple[int, Message]]:
        """Consume bytes; return the decoded messages with their sequence numbers."""
        out: list[tuple[int, Message]] = []
        for frame in self.frames.feed(data):
            try:
                out.append((frame.seq, decode_message(frame)))
            except ProtocolError:
                self.bad_messages += 1
        return out
