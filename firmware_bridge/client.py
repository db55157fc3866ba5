"""The host side of the controller protocol over any pyserial URL.

:class:`SerialController` opens its port with ``serial.serial_for_url`` (``/dev/ttyACM0``, a pty
path, ``loop://``, ``socket://host:port``), handshakes, and then serves requests from any
thread: one lock around each request/response exchange, a reader thread that routes responses
and events, and a supervisor thread that sends heartbeats and reconnects (with back-off and a
fresh handshake) when the port vanishes.  Threads start in :meth:`SerialController.open`, never
in the constructor.  :meth:`SerialController.close` turns the LEDs off and halts the stage.

Retries reuse the sequence number, so the firmware answers a duplicate without executing it
twice.  A firmware reboot (boot counter changed) is reported once, as :class:`DeviceResetError`
from the next command, because every state the host set was lost.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, TypeVar

import serial

from firmware_bridge import protocol as p
from firmware_bridge.base import (
    ControllerEvent,
    ControllerStatus,
    EventCallback,
    FirmwareInfo,
    Illumination,
    Position,
    StageLimits,
)
from firmware_bridge.exceptions import (
    BridgeError,
    BridgeInitError,
    BridgeOperationError,
    BridgeTimeoutError,
    DeviceResetError,
    EmergencyStopError,
    LinkDownError,
    SoftLimitError,
    UnsupportedFirmwareError,
)

log = logging.getLogger(__name__)

SUPPORTED_PROTOCOLS = frozenset({1})
MIN_FIRMWARE = (1, 0, 0)
REQUIRED_CAPABILITIES = (
    p.Capability.ILLUM_DIFFUSE | p.Capability.ILLUM_POLARIZED | p.Capability.STAGE_XY
)
POSITION_TOLERANCE_NM = 1000

M = TypeVar("M", bound=p.Message)

_NACK_ERRORS: dict[int, type[BridgeOperationError]] = {
    p.ErrorCode.ESTOP_ACTIVE: EmergencyStopError,
    p.ErrorCode.OUT_OF_LIMITS: SoftLimitError,
    p.ErrorCode.NO_SESSION: DeviceResetError,
}

_EVENT_KINDS: dict[type[p.Message], Callable[[Any], str]] = {
    p.MoveDone: lambda m: "move_done",
    p.LimitHit: lambda m: "limit_hit",
    p.FaultEvent: lambda m: "fault",
    p.OverTemperature: lambda m: "over_temperature",
    p.SlideEvent: lambda m: "slide_inserted" if m.present else "slide_removed",
    p.WatchdogEvent: lambda m: "watchdog",
    p.BootEvent: lambda m: "boot",
}


@dataclass
class ClientConfig:
    """Timing and policy of the host side (defaults match docs/firmware-protocol.md)."""

    baudrate: int = 115_200
    ack_timeout_s: float = 0.1
    retries: int = 3
    heartbeat_s: float = 0.5
    reconnect: bool = True
    backoff_initial_s: float = 0.05
    backoff_max_s: float = 2.0
    link_wait_s: float = 5.0
    status_poll_s: float = 0.1
    move_timeout_margin_s: float = 2.0
    limits: StageLimits | None = None


@dataclass
class LinkStats:
    """Counters of the link's health (only grow)."""

    requests: int = 0
    retries: int = 0
    timeouts: int = 0
    stale_responses: int = 0
    disconnects: int = 0
    reconnects: int = 0
    resets: int = 0
    decoder: p.DecoderStats = field(default_factory=p.DecoderStats)


def _nm(um: float) -> int:
    return round(um * p.NM_PER_UM)


def _flag_names(flags: type[p.Fault] | type[p.Capability], mask: int) -> list[str]:
    return [str(f.name).lower() for f in flags if f.name and mask & f]


class SerialController:
    """A microscope controller behind a serial URL.  Use as a context manager."""

    def __init__(
        self,
        url: str,
        config: ClientConfig | None = None,
        *,
        on_event: EventCallback | None = None,
    ) -> None:
        self.url = url
        self.config = config or ClientConfig()
        self.stats = LinkStats()
        self._listeners: list[EventCallback] = [on_event] if on_event else []
        self._port: serial.SerialBase | None = None
        self._decoder = p.MessageDecoder(frames=p.FrameDecoder())
        self.stats.decoder = self._decoder.frames.stats
        self._req_lock = threading.RLock()
        self._cond = threading.Condition()
        self._link_up = threading.Event()
        self._closing = threading.Event()
        self._threads: list[threading.Thread] = []
        self._seq = 0
        self._pending_seq: int | None = None
        self._reply: p.Message | None = None
        self._move_done: dict[int, p.MoveDone] = {}
        self._info: FirmwareInfo | None = None
        self._limits: StageLimits | None = None
        self._session_lost = False
        self._reset_unreported = False
        self._opened = False
        self._closed = False

    # -- lifecycle ---------------------------------------------------------------------------

    def __enter__(self) -> SerialController:
        return self.open()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def open(self) -> SerialController:
        """Open the port, start the reader, handshake, start heartbeats; idempotent."""
        if self._opened:
            return self
        if self._closed:
            raise BridgeInitError(f"{self.url}: controller was closed; make a new one")
        self._port = self._open_port()
        self._link_up.set()
        self._opened = True
        self._start_thread(self._read_loop, "bridge-reader")
        try:
            with self._req_lock:
                self._handshake_locked()
        except BridgeTimeoutError as exc:
            self.close()
            raise BridgeInitError(f"{self.url}: no answer from the firmware ({exc})") from exc
        except BaseException:
            self.close()
            raise
        self._start_thread(self._supervise, "bridge-heartbeat")
        return self

    def close(self) -> None:
        """LEDs off and stage halted when the link allows, threads stopped, port closed."""
        if self._closed:
            return
        self._closed = True
        if self._opened and self._port is not None and self._info is not None:
            for request in (p.SetIllumination(0, 0), p.Stop(0)):
                try:
                    self._request(request, p.Ack, surface_reset=False)
                except BridgeError as exc:
                    log.warning("%s: on close, %s failed: %s", self.url, request.TYPE.name, exc)
        self._closing.set()
        self._link_up.set()
        with self._cond:
            self._cond.notify_all()
        for thread in self._threads:
            thread.join(timeout=2.0)
        port, self._port = self._port, None
        if port is not None:
            with contextlib.suppress(serial.SerialException, OSError):
                port.close()

    def _start_thread(self, target: Callable[[], None], name: str) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
        self._threads.append(thread)
        thread.start()

    def _open_port(self) -> serial.SerialBase:
        try:
            return serial.serial_for_url(
                self.url, baudrate=self.config.baudrate, timeout=0.05, write_timeout=1.0
            )
        except (serial.SerialException, OSError, ValueError) as exc:
            raise BridgeInitError(f"cannot open serial port {self.url}: {exc}") from exc

    # -- public API --------------------------------------------------------------------------

    @property
    def info(self) -> FirmwareInfo:
        """Firmware identity from the last handshake."""
        if self._info is None:
            raise BridgeInitError(f"{self.url}: not open")
        return self._info

    @property
    def limits(self) -> StageLimits:
        """Soft limits in force: the firmware's, tightened by the host's configuration."""
        if self._limits is None:
            raise BridgeInitError(f"{self.url}: not open")
        return self._limits

    @property
    def connected(self) -> bool:
        """True while the port is open (it may vanish and come back)."""
        return self._port is not None

    def add_event_listener(self, callback: EventCallback) -> None:
        """Call ``callback`` for every event, from the reader thread (keep it short)."""
        self._listeners.append(callback)

    def remove_event_listener(self, callback: EventCallback) -> None:
        """Stop calling ``callback``; unknown callbacks are ignored."""
        with contextlib.suppress(ValueError):
            self._listeners.remove(callback)

    def status(self) -> ControllerStatus:
        """The firmware's state."""
        r = self._request(p.GetStatus(), p.StatusReply)
        return ControllerStatus(
            position=Position(r.x_nm / p.NM_PER_UM, r.y_nm / p.NM_PER_UM, r.z_nm / p.NM_PER_UM),
            moving=bool(r.flags & p.STATUS_MOVING),
            homed=bool(r.flags & p.STATUS_HOMED),
            estop=bool(r.flags & p.STATUS_ESTOP),
            slide_present=bool(r.flags & p.STATUS_SLIDE),
            illumination=Illumination(r.illumination),
            led_current=r.led_permille / p.PERMILLE,
            polariser_deg=r.polariser_mdeg / p.MDEG_PER_DEG,
            faults=_flag_names(p.Fault, r.faults),
            temperature_c=r.temperature_dc / 10,
            boot_count=r.boot_count,
            uptime_s=r.uptime_ms / 1000,
        )

    def heartbeat(self) -> None:
        """Feed the firmware watchdog now (the supervisor thread does this periodically)."""
        self._request(p.Heartbeat(), p.Ack, surface_reset=False)

    def set_illumination(self, mode: Illumination, current: float = 1.0) -> None:
        """Switch the LEDs; ``current`` is a fraction (0..1) of the rated maximum."""
        if not 0.0 <= current <= 1.0:
            raise BridgeOperationError(f"LED current {current} is not within 0..1")
        permille = 0 if mode == Illumination.OFF else round(current * p.PERMILLE)
        self._request(p.SetIllumination(int(mode), permille), p.Ack)

    def set_polariser(self, angle_deg: float) -> None:
        """Rotate the polariser to ``angle_deg`` (modulo 360)."""
        if not self.info_capability(p.Capability.POLARISER):
            raise BridgeOperationError(f"{self.info.name} has no rotating polariser")
        mdeg = round((angle_deg % 360) * p.MDEG_PER_DEG) % (360 * p.MDEG_PER_DEG)
        self._request(p.SetPolariser(mdeg), p.Ack)

    def info_capability(self, cap: p.Capability) -> bool:
        """True if the firmware announced ``cap``."""
        return str(cap.name).lower() in self.info.capabilities

    def move_to(self, pos: Position, *, wait: bool = True, timeout_s: float | None = None) -> None:
        """Move to ``pos``; refused with :class:`SoftLimitError` outside the limits."""
        problem = self.limits.violation(pos)
        if problem is not None:
            raise SoftLimitError(f"move refused by host: {problem}", p.ErrorCode.OUT_OF_LIMITS)
        start = self.status().position if wait else pos
        seq, _ = self._request_seq(p.MoveAbs(_nm(pos.x_um), _nm(pos.y_um), _nm(pos.z_um)), p.Ack)
        if wait:
            self._wait_move(seq, start, pos, timeout_s)

    def move_by(self, dx_um: float, dy_um: float, dz_um: float = 0.0, *, wait: bool = True) -> None:
        """Move by an offset; the target is checked against the soft limits first."""
        here = self.status().position
        target = Position(here.x_um + dx_um, here.y_um + dy_um, here.z_um + dz_um)
        problem = self.limits.violation(target)
        if problem is not None:
            raise SoftLimitError(f"move refused by host: {problem}", p.ErrorCode.OUT_OF_LIMITS)
        seq, _ = self._request_seq(p.MoveRel(_nm(dx_um), _nm(dy_um), _nm(dz_um)), p.Ack)
        if wait:
            self._wait_move(seq, here, target, None)

    def home(self, *, timeout_s: float | None = None) -> None:
        """Home every axis and wait until the stage is at the origin."""
        here = self.status().position
        seq, _ = self._request_seq(p.Home(p.AXIS_ALL), p.Ack)
        self._wait_move(seq, here, Position(0.0, 0.0, 0.0), timeout_s)

    def stop(self, *, emergency: bool = False) -> None:
        """Halt motion; ``emergency`` also turns the LEDs off and latches until cleared."""
        flags = p.STOP_EMERGENCY if emergency else 0
        self._request(p.Stop(flags), p.Ack, surface_reset=False)

    def clear_fault(self) -> None:
        """Clear latched faults and the emergency stop."""
        self._request(p.ClearFault(0xFFFF), p.Ack)

    # -- moves -------------------------------------------------------------------------------

    def _wait_move(
        self, seq: int, start: Position, target: Position, timeout_s: float | None
    ) -> None:
        distance = max(abs(a - b) for a, b in zip(start.as_list(), target.as_list(), strict=True))
        expected = distance / self.info.speed_um_s
        if timeout_s is None:
            timeout_s = expected * 1.5 + self.config.move_timeout_margin_s
        deadline = time.monotonic() + timeout_s
        # The MOVE_DONE event normally ends the wait; polling covers an event lost on the wire.
        wait = expected + self.config.status_poll_s
        while True:
            with self._cond:
                self._cond.wait_for(
                    lambda: seq in self._move_done or self._closing.is_set(),
                    timeout=max(0.0, min(wait, deadline - time.monotonic())),
                )
                done = self._move_done.pop(seq, None)
            if done is not None:
                self._check_move_done(done, target)
                return
            if time.monotonic() >= deadline:
                self._halt_after_timeout()
                raise BridgeTimeoutError(
                    f"stage did not reach {target.as_list()} um within {timeout_s:.1f} s "
                    "(stuck?); motion halted"
                )
            st = self.status()
            if not st.moving and self._at(st.position, target):
                return
            if not st.moving:
                raise BridgeOperationError(
                    f"stage stopped at {st.position.as_list()} um, short of {target.as_list()} um"
                )
            wait = self.config.status_poll_s

    def _halt_after_timeout(self) -> None:
        try:
            self.stop()
        except BridgeError as exc:
            log.warning("%s: halting a stuck move failed: %s", self.url, exc)

    def _check_move_done(self, done: p.MoveDone, target: Position) -> None:
        if done.result == p.MoveResult.OK:
            return
        try:
            result = p.MoveResult(done.result).name
        except ValueError:
            result = f"result {done.result}"
        where = [done.x_nm / p.NM_PER_UM, done.y_nm / p.NM_PER_UM, done.z_nm / p.NM_PER_UM]
        message = f"move to {target.as_list()} um ended with {result} at {where} um"
        if done.result == p.MoveResult.ESTOP:
            raise EmergencyStopError(message)
        raise BridgeOperationError(message)

    @staticmethod
    def _at(pos: Position, target: Position) -> bool:
        return all(
            abs(_nm(a) - _nm(b)) <= POSITION_TOLERANCE_NM
            for a, b in zip(pos.as_list(), target.as_list(), strict=True)
        )

    # -- request/response --------------------------------------------------------------------

    def _request(self, msg: p.Message, expect: type[M], *, surface_reset: bool = True) -> M:
        return self._request_seq(msg, expect, surface_reset=surface_reset)[1]

    def _request_seq(
        self, msg: p.Message, expect: type[M], *, surface_reset: bool = True
    ) -> tuple[int, M]:
        if not self._opened or (self._closed and self._closing.is_set()):
            raise BridgeInitError(f"{self.url}: controller is not open")
        with self._req_lock:
            if self._session_lost:
                self._handshake_locked()
            if surface_reset and self._reset_unreported:
                self._reset_unreported = False
                raise DeviceResetError(self._reset_message())
            if surface_reset:
                with self._cond:
                    self._move_done.clear()
            seq, reply = self._exchange(msg)
            if isinstance(reply, p.Nack) and reply.code == p.ErrorCode.NO_SESSION:
                self._handshake_locked()
                if surface_reset:
                    self._reset_unreported = False
                raise DeviceResetError(self._reset_message())
        if isinstance(reply, p.Nack):
            raise self._nack_error(msg, reply)
        if not isinstance(reply, expect):
            raise BridgeOperationError(
                f"{msg.TYPE.name} answered with {reply.TYPE.name}, expected {expect.TYPE.name}"
            )
        return seq, reply

    def _reset_message(self) -> str:
        return (
            f"{self.url}: the firmware rebooted (boot {self.info.boot_count}); "
            "illumination, position and homing were lost"
        )

    def _nack_error(self, msg: p.Message, nack: p.Nack) -> BridgeOperationError:
        try:
            code_name = p.ErrorCode(nack.code).name
        except ValueError:
            code_name = f"0x{nack.code:02x}"
        cls = _NACK_ERRORS.get(nack.code, BridgeOperationError)
        detail = f": {nack.detail}" if nack.detail else ""
        return cls(f"firmware refused {msg.TYPE.name}: {code_name}{detail}", nack.code)

    def _next_seq(self) -> int:
        # 0 is never used, so a freshly booted firmware cannot mistake a request for a retry.
        self._seq = self._seq % 255 + 1
        return self._seq

    def _exchange(self, msg: p.Message) -> tuple[int, p.Message]:
        """Send ``msg`` and wait for its answer, retrying with the same sequence number."""
        seq = self._next_seq()
        frame = msg.encode(seq)
        attempts = self.config.retries + 1
        self.stats.requests += 1
        for attempt in range(attempts):
            port = self._wait_link(msg)
            with self._cond:
                self._pending_seq, self._reply = seq, None
            try:
                port.write(frame)
            except (serial.SerialException, OSError) as exc:
                self._link_lost(port, exc)
                continue
            with self._cond:
                self._cond.wait_for(
                    functools.partial(self._answered_or_gone, port),
                    timeout=self.config.ack_timeout_s,
                )
                reply = self._take_reply()
            if reply is not None:
                return seq, reply
            if attempt + 1 < attempts:
                self.stats.retries += 1
                log.debug("%s: no answer to %s seq %d, retrying", self.url, msg.TYPE.name, seq)
        self.stats.timeouts += 1
        raise BridgeTimeoutError(
            f"{self.url}: no valid answer to {msg.TYPE.name} (seq {seq}) after {attempts} tries"
        )

    def _answered_or_gone(self, port: serial.SerialBase) -> bool:
        return self._reply is not None or self._port is not port

    def _take_reply(self) -> p.Message | None:
        # Called with the condition held: the reply (if any) and the end of the pending slot.
        reply, self._reply, self._pending_seq = self._reply, None, None
        return reply

    def _wait_link(self, msg: p.Message) -> serial.SerialBase:
        port = self._port
        if port is not None:
            return port
        if not self._link_up.wait(self.config.link_wait_s) or self._closing.is_set():
            raise LinkDownError(
                f"{self.url}: port gone for more than {self.config.link_wait_s:g} s "
                f"({msg.TYPE.name} not sent)"
            )
        port = self._port
        if port is None:
            raise LinkDownError(f"{self.url}: port gone ({msg.TYPE.name} not sent)")
        return port

    # -- handshake ---------------------------------------------------------------------------

    def _handshake_locked(self) -> None:
        _, reply = self._exchange(p.Hello(p.PROTOCOL_VERSION))
        if isinstance(reply, p.Nack):
            raise UnsupportedFirmwareError(
                f"{self.url}: firmware refused protocol {p.PROTOCOL_VERSION}: {reply.detail}"
            )
        if not isinstance(reply, p.HelloReply):
            raise BridgeOperationError(f"HELLO answered with {reply.TYPE.name}")
        info = self._firmware_info(reply)
        self._check_supported(info, reply.capabilities)
        previous = self._info
        self._info = info
        self._limits = (
            info.limits if self.config.limits is None else info.limits.intersect(self.config.limits)
        )
        self._session_lost = False
        if previous is not None and previous.boot_count != info.boot_count:
            self.stats.resets += 1
            self._reset_unreported = True
            log.warning(
                "%s: firmware rebooted (boot %d -> %d)",
                self.url,
                previous.boot_count,
                info.boot_count,
            )
            self._notify(ControllerEvent("reset", {"boot_count": info.boot_count}))
        log.info(
            "%s: %s %s, protocol %d", self.url, info.name, info.version_str, info.protocol_version
        )

    @staticmethod
    def _firmware_info(r: p.HelloReply) -> FirmwareInfo:
        def um(lo: int, hi: int) -> tuple[float, float]:
            return (lo / p.NM_PER_UM, hi / p.NM_PER_UM)

        return FirmwareInfo(
            name=r.name,
            version=(r.fw_major, r.fw_minor, r.fw_patch),
            protocol_version=r.protocol_version,
            capabilities=_flag_names(p.Capability, r.capabilities),
            boot_count=r.boot_count,
            speed_um_s=float(r.speed_um_s),
            max_led_ma=r.max_led_ma,
            watchdog_s=r.watchdog_ms / 1000,
            limits=StageLimits(
                um(r.x_min_nm, r.x_max_nm), um(r.y_min_nm, r.y_max_nm), um(r.z_min_nm, r.z_max_nm)
            ),
        )

    def _check_supported(self, info: FirmwareInfo, capabilities: int) -> None:
        problems = []
        if info.protocol_version not in SUPPORTED_PROTOCOLS:
            problems.append(
                f"protocol {info.protocol_version} (host speaks {sorted(SUPPORTED_PROTOCOLS)})"
            )
        if info.version < MIN_FIRMWARE:
            minimum = ".".join(map(str, MIN_FIRMWARE))
            problems.append(f"version {info.version_str} is older than {minimum}")
        missing = REQUIRED_CAPABILITIES & ~capabilities
        if missing:
            problems.append(f"missing capabilities {_flag_names(p.Capability, missing)}")
        if info.speed_um_s <= 0:
            problems.append("stage speed 0")
        if problems:
            raise UnsupportedFirmwareError(
                f"{self.url}: firmware {info.name!r} {info.version_str} is not supported: "
                + "; ".join(problems)
            )

    # -- threads -----------------------------------------------------------------------------

    def _read_loop(self) -> None:
        while not self._closing.is_set():
            port = self._port
            if port is None:
                self._link_up.wait(0.05)
                continue
            try:
                data = port.read(max(1, int(getattr(port, "in_waiting", 0))))
            except (serial.SerialException, OSError, TypeError, ValueError) as exc:
                # TypeError/ValueError: pyserial on a port closed under its feet.
                self._link_lost(port, exc)
                continue
            if data:
                for seq, msg in self._decoder.feed(data):
                    self._dispatch(seq, msg)

    def _dispatch(self, seq: int, msg: p.Message) -> None:
        if p.is_response(int(msg.TYPE)):
            with self._cond:
                if self._pending_seq == seq and self._reply is None:
                    self._reply = msg
                    self._cond.notify_all()
                else:
                    self.stats.stale_responses += 1
            return
        if isinstance(msg, p.MoveDone):
            with self._cond:
                self._move_done[msg.request_seq] = msg
                self._cond.notify_all()
        if isinstance(msg, p.BootEvent):
            self._session_lost = True
        kind = _EVENT_KINDS.get(type(msg))
        if kind is not None:
            self._notify(ControllerEvent(kind(msg), dataclasses.asdict(msg)))

    def _notify(self, event: ControllerEvent) -> None:
        for callback in list(self._listeners):
            try:
                callback(event)
            except Exception:  # a listener's bug must not kill the reader thread
                log.exception("event listener failed on %s", event.kind)

    def _link_lost(self, port: serial.SerialBase, exc: BaseException) -> None:
        if self._closing.is_set():
            return
        with self._cond:
            if self._port is not port:
                return
            self._port = None
            self._link_up.clear()
            self._cond.notify_all()
        with contextlib.suppress(serial.SerialException, OSError):
            port.close()
        self._decoder.frames.reset()
        self.stats.disconnects += 1
        log.warning("%s: link lost: %s", self.url, exc)
        self._notify(ControllerEvent("link_down", {"error": str(exc)}))

    def _supervise(self) -> None:
        backoff = self.config.backoff_initial_s
        while not self._closing.wait(self.config.heartbeat_s if self._port else backoff):
            if self._port is None:
                if self.config.reconnect and self._try_reconnect():
                    backoff = self.config.backoff_initial_s
                else:
                    backoff = min(backoff * 2, self.config.backoff_max_s)
                continue
            try:
                self._request(p.Heartbeat(), p.Ack, surface_reset=False)
            except DeviceResetError:
                log.info("%s: session re-established after a firmware reset", self.url)
            except BridgeError as exc:
                log.warning("%s: heartbeat failed: %s", self.url, exc)

    def _try_reconnect(self) -> bool:
        try:
            port = self._open_port()
        except BridgeInitError as exc:
            log.debug("reconnect failed: %s", exc)
            return False
        with self._cond:
            self._port = port
            self._link_up.set()
        self.stats.reconnects += 1
        log.info("%s: port is back", self.url)
        self._notify(ControllerEvent("link_up"))
        try:
            with self._req_lock:
                self._handshake_locked()
        except BridgeError as exc:
            log.warning("%s: handshake after reconnect failed: %s", self.url, exc)
            self._session_lost = True
        return True
