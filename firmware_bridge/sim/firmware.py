"""The microcontroller side of the protocol, simulated on a pseudo-terminal.

:class:`SimulatedFirmware` opens a pty pair (``os.openpty``), publishes the slave under a
stable symlink (:attr:`SimulatedFirmware.port`) and serves the protocol from a thread, so the
host talks to it through pyserial exactly as it would to ``/dev/ttyACM0``.  It keeps real
state (LEDs, polariser, a stage that takes time to travel, limits, faults, e-stop, a boot
counter), feeds a heartbeat watchdog that turns the LEDs off, and lets tests inject faults:
dropped, corrupted or delayed frames, garbage, a vanishing port (the symlink disappears and
comes back pointing at a new pty), brown-out resets, a stuck stage, over-temperature and
limit switches.  The synthetic camera reads :meth:`SimulatedFirmware.snapshot` (the physical
state), never what the host believes.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import random
import select
import tempfile
import threading
import time
import tty
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from firmware_bridge import protocol as p
from firmware_bridge.base import Illumination, Position
from firmware_bridge.exceptions import BridgeInitError

log = logging.getLogger(__name__)

ALL_CAPABILITIES = int(
    p.Capability.ILLUM_DIFFUSE
    | p.Capability.ILLUM_POLARIZED
    | p.Capability.POLARISER
    | p.Capability.STAGE_XY
    | p.Capability.STAGE_Z
    | p.Capability.HOMING
    | p.Capability.TEMPERATURE
    | p.Capability.SLIDE_SENSOR
)
NOMINAL_TEMP_DC = 250
OVER_TEMP_DC = 700
LED_FAULTS = int(p.Fault.OVER_TEMPERATURE | p.Fault.LED_DRIVER)
MOTION_FAULTS = int(p.Fault.LIMIT_SWITCH | p.Fault.STAGE_STALL)


@dataclass
class SimConfig:
    """What the simulated controller is and how it behaves."""

    name: str = "omis-sim"
    version: tuple[int, int, int] = (1, 2, 0)
    protocol_version: int = p.PROTOCOL_VERSION
    min_protocol: int = 1
    capabilities: int = ALL_CAPABILITIES
    speed_um_s: float = 20_000.0
    max_led_ma: int = 700
    watchdog_s: float = 2.0
    x_nm: tuple[int, int] = (0, 70_000_000)
    y_nm: tuple[int, int] = (0, 25_000_000)
    z_nm: tuple[int, int] = (0, 2_000_000)
    # Random faults on frames the firmware sends (seeded, so runs repeat).
    drop_rate: float = 0.0
    corrupt_rate: float = 0.0
    delay_s: float = 0.0
    seed: int = 0


@dataclass(frozen=True)
class SimState:
    """The physical state, as a camera or a test would observe it."""

    illumination: Illumination
    led_current: float
    polariser_deg: float
    position: Position
    moving: bool
    estop: bool
    faults: int
    boot_count: int
    session: bool
    slide_present: bool


@dataclass
class _Motion:
    start: tuple[int, int, int]
    target: tuple[int, int, int]
    t0: float
    duration: float
    request_seq: int
    stuck: bool


@dataclass
class _Injected:
    """Deterministic one-shot faults, consumed frame by frame."""

    drop_requests: int = 0
    drop_responses: int = 0
    drop_reply_to: dict[int, int] = field(default_factory=dict)
    corrupt_responses: int = 0
    delay_responses: int = 0
    delay_s: float = 0.0
    stuck_stage: bool = False
    reconnect_at: float | None = None


@dataclass
class _FwState:
    """Everything a brown-out wipes."""

    session: bool = False
    illumination: int = 0
    led_permille: int = 0
    polariser_mdeg: int = 0
    origin: tuple[int, int, int] = (0, 0, 0)
    homed: bool = False
    estop: bool = False
    faults: int = 0
    last_request: tuple[int, int, bytes] | None = None
    last_response: bytes = b""
    event_seq: int = 0
    last_rx: float = field(default_factory=time.monotonic)


class SimulatedFirmware:
    """A simulated microscope controller on a pty; use as a context manager."""

    def __init__(self, config: SimConfig | None = None) -> None:
        self.config = config or SimConfig()
        self._lock = threading.RLock()
        self._rng = random.Random(self.config.seed)
        self._fw = _FwState()
        self._inj = _Injected()
        self._phys = (0, 0, 0)
        self._motion: _Motion | None = None
        self._temperature_dc = NOMINAL_TEMP_DC
        self._slide = False
        self._boot_count = 1
        self._boot_time = time.monotonic()
        self._outbox: list[tuple[float, bytes]] = []
        self._decoder = p.MessageDecoder()
        self._master: int | None = None
        self._slave: int | None = None
        self._dir: str | None = None
        self._thread: threading.Thread | None = None
        self._running = False
        self._wake_r: int | None = None
        self._wake_w: int | None = None
        self.watchdog_trips = 0
        self.executed: list[str] = []  # request types executed (not re-acked duplicates)
        self.travel_s = 0.0  # total simulated travel time, for the benchmark
        self._handlers: dict[int, Callable[[int, p.Message], p.Message]] = {
            p.MsgType.HELLO: self._on_hello,
            p.MsgType.HEARTBEAT: self._on_heartbeat,
            p.MsgType.GET_STATUS: self._on_status,
            p.MsgType.SET_ILLUMINATION: self._on_illumination,
            p.MsgType.SET_POLARISER: self._on_polariser,
            p.MsgType.MOVE_ABS: self._on_move_abs,
            p.MsgType.MOVE_REL: self._on_move_rel,
            p.MsgType.HOME: self._on_home,
            p.MsgType.STOP: self._on_stop,
            p.MsgType.CLEAR_FAULT: self._on_clear_fault,
        }

    # -- lifecycle ---------------------------------------------------------------------------

    @property
    def port(self) -> str:
        """The stable path the host opens (a symlink to the current pty slave)."""
        if self._dir is None:
            raise BridgeInitError("simulated firmware not started")
        return str(Path(self._dir) / "ttySIM0")

    def __enter__(self) -> SimulatedFirmware:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def start(self) -> SimulatedFirmware:
        """Create the pty and start serving; idempotent."""
        if self._running:
            return self
        self._dir = tempfile.mkdtemp(prefix="omis-sim-")
        self._wake_r, self._wake_w = os.pipe()
        self._plug()
        self._running = True
        self._thread = threading.Thread(target=self._serve, name="sim-firmware", daemon=True)
        self._thread.start()
        self._emit(p.BootEvent(self._boot_count, p.ResetCause.POWER_ON))
        return self

    def close(self) -> None:
        """Stop serving and remove the pty; idempotent."""
        if not self._running:
            return
        self._running = False
        self._wake()
        if self._thread is not None:
            self._thread.join(timeout=2.0)
        with self._lock:
            self._unplug()
        for fd in (self._wake_r, self._wake_w):
            if fd is not None:
                os.close(fd)
        self._wake_r = self._wake_w = None
        if self._dir is not None:
            with contextlib.suppress(OSError):
                os.rmdir(self._dir)

    def _plug(self) -> None:
        master, slave = os.openpty()
        # Raw mode before anyone opens it: with the default echo the firmware would read back
        # its own replies.
        tty.setraw(slave)
        os.set_blocking(master, False)
        self._master, self._slave = master, slave
        link = Path(self.port)
        tmp = link.with_suffix(".new")
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        tmp.symlink_to(os.ttyname(slave))
        os.replace(tmp, link)
        self._decoder.frames.reset()
        log.debug("sim firmware on %s -> %s", link, os.ttyname(slave))

    def _unplug(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            Path(self.port).unlink()
        for fd in (self._master, self._slave):
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._master = self._slave = None
        self._outbox.clear()

    def _wake(self) -> None:
        if self._wake_w is not None:
            with contextlib.suppress(OSError):
                os.write(self._wake_w, b"x")

    # -- fault injection (any thread) --------------------------------------------------------

    def drop_requests(self, n: int = 1) -> None:
        """Ignore the next ``n`` valid requests, as if lost on the wire."""
        with self._lock:
            self._inj.drop_requests += n

    def drop_responses(self, n: int = 1) -> None:
        """Execute but do not send the next ``n`` frames (the host must retry, not redo)."""
        with self._lock:
            self._inj.drop_responses += n

    def drop_reply_to(self, msg_type: p.MsgType, n: int = 1) -> None:
        """Execute the next ``n`` requests of ``msg_type`` but lose their replies."""
        with self._lock:
            self._inj.drop_reply_to[int(msg_type)] = n

    def corrupt_responses(self, n: int = 1) -> None:
        """Flip a byte in each of the next ``n`` frames sent."""
        with self._lock:
            self._inj.corrupt_responses += n

    def delay_responses(self, n: int, seconds: float) -> None:
        """Hold each of the next ``n`` frames for ``seconds`` before sending."""
        with self._lock:
            self._inj.delay_responses += n
            self._inj.delay_s = seconds

    def send_garbage(self, data: bytes) -> None:
        """Write raw bytes to the host (line noise)."""
        with self._lock:
            self._queue(data, 0.0)
        self._wake()

    def disconnect(self, duration_s: float | None = None) -> None:
        """Make the port vanish (USB unplug); it returns after ``duration_s`` if given."""
        with self._lock:
            if self._master is None:
                return
            self._unplug()
            self._inj.reconnect_at = None if duration_s is None else time.monotonic() + duration_s
        self._wake()

    def reconnect(self) -> None:
        """Bring the port back at the same path (a new pty behind the symlink)."""
        with self._lock:
            self._inj.reconnect_at = None
            if self._master is None:
                self._plug()
        self._wake()

    def brownout(self) -> None:
        """Reset the controller: every state is lost, the boot counter moves on."""
        with self._lock:
            self._halt(p.MoveResult.FAULT, notify=False)
            self._fw = _FwState(origin=self._phys)
            self._boot_count += 1
            self._boot_time = time.monotonic()
            self._emit(p.BootEvent(self._boot_count, p.ResetCause.BROWN_OUT))
        self._wake()

    def set_stuck_stage(self, stuck: bool = True) -> None:
        """A stuck stage accepts moves but never arrives."""
        with self._lock:
            self._inj.stuck_stage = stuck

    def set_temperature(self, celsius: float) -> None:
        """Set the LED temperature; crossing the limit turns the LEDs off and latches a fault."""
        with self._lock:
            self._temperature_dc = round(celsius * 10)
            if self._temperature_dc >= OVER_TEMP_DC:
                self._fw.illumination = 0
                self._raise_fault(int(p.Fault.OVER_TEMPERATURE))
                self._emit(p.OverTemperature(self._temperature_dc))
        self._wake()

    def trip_limit(self, axis: int = 0) -> None:
        """A limit switch trips: motion halts and a fault latches."""
        with self._lock:
            self._halt(p.MoveResult.LIMIT)
            self._emit(p.LimitHit(axis, self._phys[axis] - self._fw.origin[axis]))
            self._raise_fault(int(p.Fault.LIMIT_SWITCH))
        self._wake()

    def insert_slide(self, present: bool = True) -> None:
        """The slide sensor sees a slide arrive (or leave)."""
        with self._lock:
            self._slide = present
            self._emit(p.SlideEvent(int(present)))
        self._wake()

    def snapshot(self) -> SimState:
        """The physical state now (what a camera would see)."""
        with self._lock:
            x, y, z = self._position_now()
            led_on = self._fw.illumination != 0 and self._fw.led_permille > 0
            return SimState(
                illumination=Illumination(self._fw.illumination) if led_on else Illumination.OFF,
                led_current=self._fw.led_permille / p.PERMILLE,
                polariser_deg=self._fw.polariser_mdeg / p.MDEG_PER_DEG,
                position=Position(x / p.NM_PER_UM, y / p.NM_PER_UM, z / p.NM_PER_UM),
                moving=self._motion is not None,
                estop=self._fw.estop,
                faults=self._fw.faults,
                boot_count=self._boot_count,
                session=self._fw.session,
                slide_present=self._slide,
            )

    # -- the serving loop --------------------------------------------------------------------

    def _serve(self) -> None:
        while self._running:
            with self._lock:
                fds = [fd for fd in (self._wake_r, self._master) if fd is not None]
                timeout = self._next_deadline() - time.monotonic()
            readable, _, _ = select.select(fds, [], [], max(0.0, min(timeout, 0.5)))
            for fd in readable:
                if fd == self._wake_r:
                    os.read(fd, 1024)
                else:
                    self._read_host()
            with self._lock:
                self._tick()

    def _read_host(self) -> None:
        with self._lock:
            if self._master is None:
                return
            try:
                data = os.read(self._master, 4096)
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EIO):
                    log.warning("sim firmware read failed: %s", exc)
                return
            for seq, msg in self._decoder.feed(data):
                self._on_message(seq, msg)

    def _next_deadline(self) -> float:
        now = time.monotonic()
        deadlines = [now + 0.5]
        if self._motion is not None and not self._motion.stuck:
            deadlines.append(self._motion.t0 + self._motion.duration)
        if self._outbox:
            deadlines.append(min(due for due, _ in self._outbox))
        if self._inj.reconnect_at is not None:
            deadlines.append(self._inj.reconnect_at)
        if self._fw.session:
            deadlines.append(self._fw.last_rx + self.config.watchdog_s)
        return min(deadlines)

    def _tick(self) -> None:
        now = time.monotonic()
        if self._inj.reconnect_at is not None and now >= self._inj.reconnect_at:
            self._inj.reconnect_at = None
            self._plug()
        motion = self._motion
        if motion is not None and not motion.stuck and now >= motion.t0 + motion.duration:
            self._phys = motion.target
            self._motion = None
            self._emit(p.MoveDone(motion.request_seq, p.MoveResult.OK, *self._fw_position()))
        self._check_watchdog(now)
        self._flush_outbox(now)

    def _check_watchdog(self, now: float) -> None:
        if not self._fw.session or now - self._fw.last_rx < self.config.watchdog_s:
            return
        if self._fw.illumination == 0 and self._motion is None:
            return
        # The host went silent: never leave the LEDs on or the stage running unattended.
        log.info("sim firmware watchdog: host silent, LEDs off")
        self.watchdog_trips += 1
        self._fw.illumination = 0
        self._halt(p.MoveResult.HALTED)
        self._emit(p.WatchdogEvent())

    # -- outgoing frames ---------------------------------------------------------------------

    def _emit(self, msg: p.Message) -> None:
        """Send an event with the firmware's own event sequence number."""
        self._fw.event_seq = (self._fw.event_seq + 1) % 256
        self._send(msg.encode(self._fw.event_seq))

    def _send(self, frame: bytes) -> None:
        inj = self._inj
        if inj.drop_responses > 0:
            inj.drop_responses -= 1
            return
        if self.config.drop_rate and self._rng.random() < self.config.drop_rate:
            return
        if inj.corrupt_responses > 0 or (
            self.config.corrupt_rate and self._rng.random() < self.config.corrupt_rate
        ):
            inj.corrupt_responses = max(0, inj.corrupt_responses - 1)
            frame = self._corrupt(frame)
        delay = self.config.delay_s
        if inj.delay_responses > 0:
            inj.delay_responses -= 1
            delay += inj.delay_s
        self._queue(frame, delay)

    def _corrupt(self, frame: bytes) -> bytes:
        data = bytearray(frame)
        i = self._rng.randrange(1, len(data) - 1)
        data[i] ^= 1 << self._rng.randrange(8)
        return bytes(data)

    def _queue(self, data: bytes, delay: float) -> None:
        self._outbox.append((time.monotonic() + delay, data))

    def _flush_outbox(self, now: float) -> None:
        due = [item for item in self._outbox if item[0] <= now]
        if not due:
            return
        self._outbox = [item for item in self._outbox if item[0] > now]
        for _, data in sorted(due, key=lambda item: item[0]):
            if self._master is None:
                return
            try:
                os.write(self._master, data)
            except OSError as exc:
                # A UART whose host does not read just loses bytes; so do we.
                log.debug("sim firmware write dropped: %s", exc)

    # -- requests ----------------------------------------------------------------------------

    def _on_message(self, seq: int, msg: p.Message) -> None:
        if not p.is_request(int(msg.TYPE)):
            return
        if self._inj.drop_requests > 0:
            self._inj.drop_requests -= 1
            return
        self._fw.last_rx = time.monotonic()
        key = (seq, int(msg.TYPE), msg.to_payload())
        if key == self._fw.last_request:
            # A retry of the request just executed: answer again, do not execute twice.
            self._send(self._fw.last_response)
            return
        if not self._fw.session and msg.TYPE != p.MsgType.HELLO:
            reply: p.Message = p.Nack(int(msg.TYPE), p.ErrorCode.NO_SESSION, "send HELLO first")
        else:
            reply = self._handlers[int(msg.TYPE)](seq, msg)
        if not isinstance(reply, p.Nack):
            self.executed.append(msg.TYPE.name)
        frame = reply.encode(seq)
        self._fw.last_request, self._fw.last_response = key, frame
        if self._inj.drop_reply_to.get(int(msg.TYPE), 0) > 0:
            self._inj.drop_reply_to[int(msg.TYPE)] -= 1
            return
        self._send(frame)

    def _nack(self, msg: p.Message, code: p.ErrorCode, detail: str) -> p.Nack:
        return p.Nack(int(msg.TYPE), int(code), detail)

    def _on_hello(self, seq: int, msg: p.Message) -> p.Message:
        c = self.config
        if not isinstance(msg, p.Hello) or msg.host_protocol < c.min_protocol:
            return self._nack(
                msg, p.ErrorCode.PROTOCOL_VERSION, f"needs protocol >= {c.min_protocol}"
            )
        self._fw.session = True
        return p.HelloReply(
            min(msg.host_protocol, c.protocol_version),
            *c.version,
            c.capabilities,
            self._boot_count,
            round(c.speed_um_s),
            c.max_led_ma,
            round(c.watchdog_s * 1000),
            *c.x_nm,
            *c.y_nm,
            *c.z_nm,
            c.name,
        )

    def _on_heartbeat(self, seq: int, msg: p.Message) -> p.Message:
        return p.Ack(int(msg.TYPE))

    def _on_status(self, seq: int, msg: p.Message) -> p.Message:
        flags = (
            (p.STATUS_MOVING if self._motion is not None else 0)
            | (p.STATUS_HOMED if self._fw.homed else 0)
            | (p.STATUS_ESTOP if self._fw.estop else 0)
            | (p.STATUS_SLIDE if self._slide else 0)
        )
        return p.StatusReply(
            *self._fw_position(),
            flags,
            self._fw.illumination,
            self._fw.led_permille,
            self._fw.polariser_mdeg,
            self._fw.faults,
            self._temperature_dc,
            self._boot_count,
            round((time.monotonic() - self._boot_time) * 1000) % 2**32,
        )

    def _on_illumination(self, seq: int, msg: p.Message) -> p.Message:
        if not isinstance(msg, p.SetIllumination):
            return self._nack(msg, p.ErrorCode.BAD_PAYLOAD, "")
        if msg.mode not in (0, 1, 2) or msg.current_permille > p.PERMILLE:
            return self._nack(msg, p.ErrorCode.BAD_PAYLOAD, "mode 0..2, current 0..1000")
        need = {1: p.Capability.ILLUM_DIFFUSE, 2: p.Capability.ILLUM_POLARIZED}.get(msg.mode)
        if need is not None and not self.config.capabilities & need:
            return self._nack(msg, p.ErrorCode.UNSUPPORTED, f"no {need.name}")
        if msg.mode != 0 and self._fw.estop:
            return self._nack(msg, p.ErrorCode.ESTOP_ACTIVE, "emergency stop latched")
        if msg.mode != 0 and self._fw.faults & LED_FAULTS:
            return self._nack(msg, p.ErrorCode.FAULT_ACTIVE, f"faults 0x{self._fw.faults:04x}")
        self._fw.illumination = msg.mode
        self._fw.led_permille = msg.current_permille
        return p.Ack(int(msg.TYPE))

    def _on_polariser(self, seq: int, msg: p.Message) -> p.Message:
        if not self.config.capabilities & p.Capability.POLARISER:
            return self._nack(msg, p.ErrorCode.UNSUPPORTED, "no rotating polariser")
        if not isinstance(msg, p.SetPolariser) or msg.angle_mdeg >= 360 * p.MDEG_PER_DEG:
            return self._nack(msg, p.ErrorCode.BAD_PAYLOAD, "angle 0..359999 mdeg")
        self._fw.polariser_mdeg = msg.angle_mdeg
        return p.Ack(int(msg.TYPE))

    def _motion_refusal(self, msg: p.Message) -> p.Nack | None:
        if self._fw.estop:
            return self._nack(msg, p.ErrorCode.ESTOP_ACTIVE, "emergency stop latched")
        if self._fw.faults & MOTION_FAULTS:
            return self._nack(msg, p.ErrorCode.FAULT_ACTIVE, f"faults 0x{self._fw.faults:04x}")
        if self._motion is not None:
            return self._nack(msg, p.ErrorCode.BUSY, "stage is moving")
        return None

    def _on_move_abs(self, seq: int, msg: p.Message) -> p.Message:
        if not isinstance(msg, p.MoveAbs):
            return self._nack(msg, p.ErrorCode.BAD_PAYLOAD, "")
        return self._start_move(seq, msg, (msg.x_nm, msg.y_nm, msg.z_nm))

    def _on_move_rel(self, seq: int, msg: p.Message) -> p.Message:
        if not isinstance(msg, p.MoveRel):
            return self._nack(msg, p.ErrorCode.BAD_PAYLOAD, "")
        x, y, z = self._fw_position()
        return self._start_move(seq, msg, (x + msg.dx_nm, y + msg.dy_nm, z + msg.dz_nm))

    def _start_move(self, seq: int, msg: p.Message, target: tuple[int, int, int]) -> p.Message:
        refusal = self._motion_refusal(msg)
        if refusal is not None:
            return refusal
        if not self._fw.homed:
            return self._nack(msg, p.ErrorCode.NOT_HOMED, "home first")
        c = self.config
        for axis, value, (lo, hi) in zip("xyz", target, (c.x_nm, c.y_nm, c.z_nm), strict=True):
            if not lo <= value <= hi:
                return self._nack(msg, p.ErrorCode.OUT_OF_LIMITS, f"{axis}={value} nm")
        phys = tuple(t + o for t, o in zip(target, self._fw.origin, strict=True))
        self._begin_motion(seq, (phys[0], phys[1], phys[2]))
        return p.Ack(int(msg.TYPE))

    def _on_home(self, seq: int, msg: p.Message) -> p.Message:
        if not self.config.capabilities & p.Capability.HOMING:
            return self._nack(msg, p.ErrorCode.UNSUPPORTED, "no homing")
        refusal = self._motion_refusal(msg)
        if refusal is not None:
            return refusal
        # Homing finds the switches at the physical zero; coordinates are exact afterwards.
        self._fw.origin = (0, 0, 0)
        self._fw.homed = True
        self._begin_motion(seq, (0, 0, 0))
        return p.Ack(int(msg.TYPE))

    def _begin_motion(self, seq: int, target: tuple[int, int, int]) -> None:
        distance_nm = max(abs(t - s) for t, s in zip(target, self._phys, strict=True))
        duration = distance_nm / p.NM_PER_UM / self.config.speed_um_s
        self.travel_s += duration
        self._motion = _Motion(
            self._phys, target, time.monotonic(), duration, seq, self._inj.stuck_stage
        )

    def _on_stop(self, seq: int, msg: p.Message) -> p.Message:
        emergency = isinstance(msg, p.Stop) and bool(msg.flags & p.STOP_EMERGENCY)
        if emergency:
            self._fw.estop = True
            self._fw.illumination = 0
        self._halt(p.MoveResult.ESTOP if emergency else p.MoveResult.HALTED)
        return p.Ack(int(msg.TYPE))

    def _on_clear_fault(self, seq: int, msg: p.Message) -> p.Message:
        mask = msg.mask if isinstance(msg, p.ClearFault) else 0xFFFF
        if mask & p.Fault.OVER_TEMPERATURE and self._temperature_dc >= OVER_TEMP_DC:
            return self._nack(msg, p.ErrorCode.FAULT_ACTIVE, "still over temperature")
        self._fw.faults &= ~mask
        self._fw.estop = False
        return p.Ack(int(msg.TYPE))

    # -- state helpers -----------------------------------------------------------------------

    def _position_now(self) -> tuple[int, int, int]:
        m = self._motion
        if m is None:
            return self._phys
        if m.stuck:
            return m.start
        frac = min(1.0, (time.monotonic() - m.t0) / m.duration) if m.duration > 0 else 1.0
        return (
            round(m.start[0] + (m.target[0] - m.start[0]) * frac),
            round(m.start[1] + (m.target[1] - m.start[1]) * frac),
            round(m.start[2] + (m.target[2] - m.start[2]) * frac),
        )

    def _fw_position(self) -> tuple[int, int, int]:
        x, y, z = self._position_now()
        ox, oy, oz = self._fw.origin
        return (x - ox, y - oy, z - oz)

    def _halt(self, result: p.MoveResult, *, notify: bool = True) -> None:
        if self._motion is None:
            return
        self._phys = self._position_now()
        seq = self._motion.request_seq
        self._motion = None
        if notify:
            self._emit(p.MoveDone(seq, int(result), *self._fw_position()))

    def _raise_fault(self, bits: int) -> None:
        new = bits & ~self._fw.faults
        self._fw.faults |= bits
        if new:
            self._emit(p.FaultEvent(self._fw.faults, new))
