"""The serial client against the simulated firmware over a real pty, through every fault."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest
import serial

from firmware_bridge import protocol as p
from firmware_bridge.base import ControllerEvent, Illumination, Position
from firmware_bridge.client import ClientConfig, SerialController
from firmware_bridge.exceptions import (
    BridgeInitError,
    BridgeOperationError,
    BridgeTimeoutError,
    DeviceResetError,
    EmergencyStopError,
    LinkDownError,
    SoftLimitError,
    UnsupportedFirmwareError,
)
from firmware_bridge.sim.firmware import SimConfig, SimulatedFirmware

FAST = ClientConfig(
    ack_timeout_s=0.05,
    retries=3,
    heartbeat_s=0.1,
    backoff_initial_s=0.02,
    backoff_max_s=0.1,
    link_wait_s=2.0,
    status_poll_s=0.05,
    move_timeout_margin_s=0.3,
)


def wait_until(predicate: object, timeout: float = 2.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return True
        time.sleep(0.01)
    return False


@pytest.fixture
def fw() -> Iterator[SimulatedFirmware]:
    with SimulatedFirmware(SimConfig(speed_um_s=100_000, watchdog_s=1.0)) as sim:
        yield sim


@pytest.fixture
def events() -> list[ControllerEvent]:
    return []


@pytest.fixture
def ctl(fw: SimulatedFirmware, events: list[ControllerEvent]) -> Iterator[SerialController]:
    with SerialController(fw.port, FAST, on_event=events.append) as c:
        c.home()
        yield c


def kinds(events: list[ControllerEvent]) -> list[str]:
    return [e.kind for e in events]


def test_constructor_starts_nothing_and_open_handshakes(fw: SimulatedFirmware) -> None:
    before = threading.active_count()
    c = SerialController(fw.port, FAST)
    assert threading.active_count() == before and not c.connected
    with c:
        assert c.open() is c  # idempotent
        assert c.info.name == "omis-sim" and c.info.version == (1, 2, 0)
        assert "illum_polarized" in c.info.capabilities
        assert threading.active_count() == before + 2
    c.close()  # idempotent
    assert wait_until(lambda: threading.active_count() == before)


def test_illumination_and_polariser_reach_the_hardware(
    ctl: SerialController, fw: SimulatedFirmware
) -> None:
    ctl.set_illumination(Illumination.POLARIZED, 0.4)
    ctl.set_polariser(91.5)
    state = fw.snapshot()
    assert state.illumination == Illumination.POLARIZED and state.led_current == 0.4
    assert state.polariser_deg == 91.5
    status = ctl.status()
    assert status.illumination == Illumination.POLARIZED and status.polariser_deg == 91.5


def test_close_turns_leds_off_and_halts_the_stage(fw: SimulatedFirmware) -> None:
    c = SerialController(fw.port, FAST).open()
    c.home()
    c.set_illumination(Illumination.DIFFUSE)
    c.move_to(Position(60_000, 20_000), wait=False)
    c.close()
    state = fw.snapshot()
    assert state.illumination == Illumination.OFF and not state.moving
    assert state.position.x_um < 60_000


def test_moves_arrive_and_report_position(ctl: SerialController, fw: SimulatedFirmware) -> None:
    ctl.move_to(Position(1500, 700, 10))
    ctl.move_by(-500, 300)
    assert fw.snapshot().position == Position(1000, 1000, 10)
    assert ctl.status().position == Position(1000, 1000, 10)


def test_lost_request_is_retried(ctl: SerialController, fw: SimulatedFirmware) -> None:
    fw.drop_requests(2)
    ctl.set_illumination(Illumination.DIFFUSE)
    assert fw.snapshot().illumination == Illumination.DIFFUSE
    assert ctl.stats.retries >= 2


def test_lost_reply_is_retried_with_the_same_seq_and_not_executed_twice(
    ctl: SerialController, fw: SimulatedFirmware
) -> None:
    ctl.move_to(Position(1000, 1000))
    fw.drop_reply_to(p.MsgType.MOVE_REL)
    ctl.move_by(250, 0)
    assert fw.executed.count("MOVE_REL") == 1
    assert fw.snapshot().position == Position(1250, 1000)
    assert ctl.stats.retries >= 1


def test_corrupted_replies_and_garbage_are_survived(
    ctl: SerialController, fw: SimulatedFirmware
) -> None:
    fw.corrupt_responses(2)
    assert ctl.status().homed
    fw.send_garbage(bytes(range(1, 200)) + b"\x00\xa5\x07garbage\x00\x02\x01")
    assert ctl.status().homed
    stats = ctl.stats.decoder
    assert stats.bad_crc + stats.bad_cobs + stats.bad_length >= 3


def test_delayed_reply_gives_a_stale_duplicate_and_the_right_answer(
    ctl: SerialController, fw: SimulatedFirmware
) -> None:
    fw.delay_responses(1, 0.08)
    ctl.set_illumination(Illumination.DIFFUSE, 0.5)
    assert fw.executed.count("SET_ILLUMINATION") == 1
    assert wait_until(lambda: ctl.stats.stale_responses >= 1)
    assert ctl.status().led_current == 0.5


def test_silence_is_a_timeout_after_bounded_retries(
    ctl: SerialController, fw: SimulatedFirmware
) -> None:
    fw.drop_requests(100)
    start = time.monotonic()
    with pytest.raises(BridgeTimeoutError, match="after 4 tries"):
        ctl.status()
    assert time.monotonic() - start < 1.0


def test_port_vanishes_and_returns(
    ctl: SerialController, fw: SimulatedFirmware, events: list[ControllerEvent]
) -> None:
    ctl.set_illumination(Illumination.DIFFUSE)
    fw.disconnect(0.3)
    assert wait_until(lambda: not ctl.connected)
    status = ctl.status()  # waits for the port to come back, then answers
    assert status.illumination == Illumination.DIFFUSE and status.boot_count == 1
    assert ctl.stats.disconnects == 1 and ctl.stats.reconnects >= 1
    assert "link_down" in kinds(events) and "link_up" in kinds(events)


def test_port_that_stays_away_is_a_link_error(fw: SimulatedFirmware) -> None:
    config = ClientConfig(**{**FAST.__dict__, "link_wait_s": 0.3})
    with SerialController(fw.port, config) as c:
        fw.disconnect()
        assert wait_until(lambda: not c.connected)
        with pytest.raises(LinkDownError, match="port gone"):
            c.status()
        fw.reconnect()
        assert wait_until(lambda: c.connected)
        assert c.status().boot_count == 1


def test_brownout_is_reported_once_and_state_is_honest(
    ctl: SerialController, fw: SimulatedFirmware, events: list[ControllerEvent]
) -> None:
    ctl.set_illumination(Illumination.DIFFUSE)
    ctl.move_to(Position(2000, 2000))
    fw.brownout()
    with pytest.raises(DeviceResetError, match="rebooted"):
        ctl.set_illumination(Illumination.DIFFUSE)
    status = ctl.status()
    assert status.boot_count == 2 and not status.homed
    assert status.illumination == Illumination.OFF
    assert fw.snapshot().illumination == Illumination.OFF
    assert "reset" in kinds(events) and ctl.stats.resets == 1
    with pytest.raises(BridgeOperationError, match="NOT_HOMED"):
        ctl.move_to(Position(10, 10))
    ctl.home()
    ctl.move_to(Position(10, 10))


def test_brownout_with_lost_boot_event_is_still_detected(
    ctl: SerialController, fw: SimulatedFirmware
) -> None:
    fw.drop_responses(1)  # the BOOT event
    fw.brownout()
    with pytest.raises(DeviceResetError):
        ctl.status()
    assert ctl.status().boot_count == 2


def test_stuck_stage_times_out_and_is_halted(ctl: SerialController, fw: SimulatedFirmware) -> None:
    fw.set_stuck_stage()
    start = time.monotonic()
    with pytest.raises(BridgeTimeoutError, match="stuck"):
        ctl.move_to(Position(3000, 0))
    assert time.monotonic() - start < 1.5
    assert not fw.snapshot().moving and not ctl.status().moving


def test_limits_are_enforced_by_the_host(ctl: SerialController, fw: SimulatedFirmware) -> None:
    with pytest.raises(SoftLimitError, match="outside the soft limits"):
        ctl.move_to(Position(80_000, 0))
    with pytest.raises(SoftLimitError):
        ctl.move_by(0, -1)
    assert "MOVE_ABS" not in fw.executed and "MOVE_REL" not in fw.executed


def test_limits_are_enforced_by_the_firmware(fw: SimulatedFirmware) -> None:
    # Talk raw protocol, as a host without soft limits would.
    port = serial.serial_for_url(fw.port, timeout=0.5)
    decoder = p.MessageDecoder()
    try:
        replies = []
        for seq, msg in enumerate(
            [p.Hello(), p.Home(), p.MoveAbs(80_000_000, 0, 0), p.MoveRel(0, -1, 0)], start=1
        ):
            port.write(msg.encode(seq))
            deadline = time.monotonic() + 1.0
            got: list[tuple[int, p.Message]] = []
            while time.monotonic() < deadline and not any(s == seq for s, _ in got):
                data = port.read(max(1, port.in_waiting))
                got += [m for m in decoder.feed(data) if p.is_response(int(m[1].TYPE))]
            replies.append(next(m for s, m in got if s == seq))
            time.sleep(0.02)
    finally:
        port.close()
    assert isinstance(replies[2], p.Nack) and replies[2].code == p.ErrorCode.OUT_OF_LIMITS
    assert isinstance(replies[3], p.Nack) and replies[3].code == p.ErrorCode.OUT_OF_LIMITS


def test_emergency_stop_latches_until_cleared(ctl: SerialController, fw: SimulatedFirmware) -> None:
    ctl.set_illumination(Illumination.DIFFUSE)
    result: list[BaseException] = []

    def long_move() -> None:
        try:
            ctl.move_to(Position(60_000, 20_000))
        except BridgeOperationError as exc:
            result.append(exc)

    mover = threading.Thread(target=long_move)
    mover.start()
    time.sleep(0.1)
    ctl.stop(emergency=True)
    mover.join(2.0)
    assert result and isinstance(result[0], EmergencyStopError)
    state = fw.snapshot()
    assert state.estop and state.illumination == Illumination.OFF and not state.moving
    with pytest.raises(EmergencyStopError):
        ctl.set_illumination(Illumination.DIFFUSE)
    with pytest.raises(EmergencyStopError):
        ctl.move_to(Position(10, 10))
    ctl.clear_fault()
    ctl.set_illumination(Illumination.DIFFUSE)
    assert fw.snapshot().illumination == Illumination.DIFFUSE


def test_watchdog_turns_leds_off_when_heartbeats_stop(
    events: list[ControllerEvent],
) -> None:
    with SimulatedFirmware(SimConfig(watchdog_s=0.3)) as fw:
        quiet = ClientConfig(**{**FAST.__dict__, "heartbeat_s": 30.0})
        with SerialController(fw.port, quiet, on_event=events.append) as c:
            c.set_illumination(Illumination.DIFFUSE)
            assert wait_until(lambda: fw.snapshot().illumination == Illumination.OFF, 1.5)
            assert fw.watchdog_trips == 1
            assert wait_until(lambda: "watchdog" in kinds(events))
            assert c.status().illumination == Illumination.OFF


def test_heartbeats_keep_the_watchdog_fed() -> None:
    with SimulatedFirmware(SimConfig(watchdog_s=0.3)) as fw, SerialController(fw.port, FAST) as c:
        c.set_illumination(Illumination.DIFFUSE)
        time.sleep(0.8)
        assert fw.snapshot().illumination == Illumination.DIFFUSE
        assert fw.watchdog_trips == 0


@pytest.mark.parametrize(
    ("config", "reason"),
    [
        (SimConfig(version=(0, 9, 1)), "0.9.1 is older than 1.0.0"),
        (SimConfig(protocol_version=2, min_protocol=2), "refused protocol 1.*needs protocol >= 2"),
        (
            SimConfig(capabilities=int(p.Capability.ILLUM_DIFFUSE | p.Capability.STAGE_XY)),
            "missing capabilities.*illum_polarized",
        ),
    ],
)
def test_unsupported_firmware_is_refused_with_the_reason(config: SimConfig, reason: str) -> None:
    with SimulatedFirmware(config) as fw:
        before = threading.active_count()
        with pytest.raises(UnsupportedFirmwareError, match=reason):
            SerialController(fw.port, FAST).open()
        assert wait_until(lambda: threading.active_count() == before)


def test_concurrent_callers_each_get_their_own_answer(fw: SimulatedFirmware) -> None:
    # No retries: a reply routed to the wrong caller would surface as a timeout in some thread.
    strict = ClientConfig(**{**FAST.__dict__, "ack_timeout_s": 1.0, "retries": 0})
    angles = {10.0 * (i + 1) for i in range(4)}
    errors: list[BaseException] = []
    seen: list[float] = []
    with SerialController(fw.port, strict) as c:

        def worker(angle: float) -> None:
            try:
                for _ in range(15):
                    c.set_polariser(angle)
                    seen.append(c.status().polariser_deg)
            except Exception as exc:  # reported below, not lost in the thread
                errors.append(exc)

        threads = [threading.Thread(target=worker, args=(a,)) for a in sorted(angles)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30.0)
        assert not errors, errors
        assert len(seen) == 60 and set(seen) <= angles
        assert c.stats.timeouts == 0 and c.stats.retries == 0
        assert c.stats.stale_responses == 0
        assert c.stats.requests >= 120  # plus the supervisor's heartbeats, sent meanwhile


def test_events_reach_listeners(
    ctl: SerialController, fw: SimulatedFirmware, events: list[ControllerEvent]
) -> None:
    fw.insert_slide()
    assert wait_until(lambda: "slide_inserted" in kinds(events))
    assert ctl.status().slide_present
    fw.set_temperature(75.0)
    assert wait_until(lambda: "over_temperature" in kinds(events))
    with pytest.raises(BridgeOperationError, match="FAULT_ACTIVE"):
        ctl.set_illumination(Illumination.DIFFUSE)
    assert ctl.status().faults == ["over_temperature"]
    fw.set_temperature(30.0)
    ctl.clear_fault()
    ctl.set_illumination(Illumination.DIFFUSE)


def test_missing_port_names_the_port() -> None:
    with pytest.raises(BridgeInitError, match="/dev/ttyNOPE"):
        SerialController("/dev/ttyNOPE", FAST).open()


def test_silent_port_is_an_init_error() -> None:
    # loop:// echoes our own requests back: a port with no firmware behind it.
    with pytest.raises(BridgeInitError, match="no answer from the firmware"):
        SerialController("loop://", FAST).open()
