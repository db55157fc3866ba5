"""The framed protocol: round trips of every message, COBS/CRC vectors, and parser fuzzing.

The hypothesis tests together run more than 10,000 random and corrupted frames.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from firmware_bridge import protocol as p
from firmware_bridge.exceptions import ProtocolError


def fuzz(n: int) -> settings:
    """Hypothesis settings for ``n`` examples (the four fuzz tests add up to 10,000)."""
    return settings(max_examples=n, deadline=None, suppress_health_check=list(HealthCheck))


SAMPLES: list[p.Message] = [
    p.Hello(1),
    p.Heartbeat(),
    p.GetStatus(),
    p.SetIllumination(2, 750),
    p.SetPolariser(359_999),
    p.MoveAbs(70_000_000, -5, 2_000_000),
    p.MoveRel(-1000, 0, 1),
    p.Home(p.AXIS_ALL),
    p.Stop(p.STOP_EMERGENCY),
    p.ClearFault(0xFFFF),
    p.Ack(int(p.MsgType.MOVE_ABS)),
    p.Nack(int(p.MsgType.MOVE_ABS), int(p.ErrorCode.OUT_OF_LIMITS), "x=9 nm"),
    p.HelloReply(1, 1, 2, 3, 0xFF, 7, 20_000, 700, 2000, 0, 1, 0, 2, 0, 3, "omis-fw"),
    p.StatusReply(1, -2, 3, 0b1011, 1, 1000, 90_000, 0b101, -150, 9, 123_456),
    p.MoveDone(200, int(p.MoveResult.LIMIT), 1, 2, 3),
    p.LimitHit(1, -42),
    p.FaultEvent(0b11, 0b10),
    p.OverTemperature(712),
    p.SlideEvent(1),
    p.WatchdogEvent(),
    p.BootEvent(2**32 - 1, int(p.ResetCause.BROWN_OUT)),
]


def test_samples_cover_every_message_type() -> None:
    assert {int(m.TYPE) for m in SAMPLES} == set(p.MESSAGE_TYPES)


@pytest.mark.parametrize("msg", SAMPLES, ids=lambda m: type(m).__name__)
def test_round_trip_every_message(msg: p.Message) -> None:
    decoder = p.MessageDecoder()
    wire = msg.encode(seq=42)
    assert wire[0] == 0 and wire[-1] == 0 and 0 not in wire[1:-1]
    assert decoder.feed(wire) == [(42, msg)]
    assert decoder.frames.stats.errors == 0


def test_crc_is_ccitt_false() -> None:
    assert p.crc16(b"123456789") == 0x29B1


@pytest.mark.parametrize(
    ("raw", "encoded"),
    [
        (b"", b"\x01"),
        (b"\x00", b"\x01\x01"),
        (b"\x00\x00", b"\x01\x01\x01"),
        (b"\x11\x22\x00\x33", b"\x03\x11\x22\x02\x33"),
        (b"\x11\x00\x00\x00", b"\x02\x11\x01\x01\x01"),
        (bytes(range(1, 255)), b"\xff" + bytes(range(1, 255)) + b"\x01"),
    ],
)
def test_cobs_vectors(raw: bytes, encoded: bytes) -> None:
    assert p.cobs_encode(raw) == encoded
    assert p.cobs_decode(encoded) == raw


def test_byte_by_byte_feeding_gives_the_same_frames() -> None:
    wire = b"".join(m.encode(i) for i, m in enumerate(SAMPLES))
    decoder = p.FrameDecoder()
    frames = [f for b in wire for f in decoder.feed(bytes([b]))]
    assert [(f.seq, f.type) for f in frames] == [(i, int(m.TYPE)) for i, m in enumerate(SAMPLES)]


def test_encoder_refuses_what_does_not_fit() -> None:
    with pytest.raises(ProtocolError):
        p.encode_frame(256, 1)
    with pytest.raises(ProtocolError):
        p.encode_frame(1, 1, bytes(p.MAX_PAYLOAD + 1))
    with pytest.raises(ProtocolError):
        p.SetIllumination(3, 70_000).encode(1)


def test_bad_payload_and_unknown_type_are_counted_not_raised() -> None:
    decoder = p.MessageDecoder()
    wire = p.encode_frame(1, int(p.MsgType.MOVE_ABS), b"\x01\x02") + p.encode_frame(2, 0x7F)
    assert decoder.feed(wire) == []
    assert decoder.bad_messages == 2


def test_oversized_run_is_dropped_and_memory_stays_bounded() -> None:
    decoder = p.FrameDecoder()
    assert decoder.feed(b"\x01" * 5000) == []
    assert decoder.stats.overflow == 1
    good = p.Heartbeat().encode(9)
    assert [f.seq for f in decoder.feed(good)] == [9]


# -- fuzzing ----------------------------------------------------------------------------------

frames_st = st.builds(
    lambda seq, typ, payload: (seq, typ, payload),
    st.integers(0, 255),
    st.integers(0, 255),
    st.binary(max_size=p.MAX_PAYLOAD),
)


@fuzz(3600)
@given(st.lists(st.binary(max_size=300), max_size=8))
def test_random_bytes_never_raise(chunks: list[bytes]) -> None:
    decoder = p.MessageDecoder()
    for chunk in chunks:
        for seq, msg in decoder.feed(chunk):
            assert 0 <= seq <= 255 and isinstance(msg, p.Message)
    assert len(decoder.frames._buf) <= p.MAX_ENCODED
    # Whatever came before, the decoder still decodes a good frame.
    assert decoder.feed(p.Heartbeat().encode(77)) == [(77, p.Heartbeat())]


@fuzz(2500)
@given(st.binary(max_size=300), st.lists(frames_st, min_size=1, max_size=4), st.integers(1, 64))
def test_valid_frames_after_garbage_are_decoded(
    garbage: bytes, frames: list[tuple[int, int, bytes]], split: int
) -> None:
    wire = garbage + b"".join(p.encode_frame(*f) for f in frames)
    decoder = p.FrameDecoder()
    got: list[tuple[int, int, bytes]] = []
    for start in range(0, len(wire), split):
        got += [(f.seq, f.type, f.payload) for f in decoder.feed(wire[start : start + split])]
    # Garbage may (very rarely) hold a valid frame of its own; ours come last, in order.
    assert got[len(got) - len(frames) :] == frames


@fuzz(2900)
@given(
    frames_st,
    frames_st,
    st.integers(0, 10_000),
    st.sampled_from(["flip", "drop", "insert", "truncate"]),
    st.integers(1, 255),
)
def test_corrupted_frame_is_dropped_and_the_next_survives(
    first: tuple[int, int, bytes],
    second: tuple[int, int, bytes],
    where: int,
    how: str,
    value: int,
) -> None:
    bad = bytearray(p.encode_frame(*first))
    i = 1 + where % (len(bad) - 2)  # inside the frame, not the delimiters
    if how == "flip":
        bad[i] ^= value
    elif how == "drop":
        del bad[i]
    elif how == "insert":
        bad.insert(i, value)
    else:
        bad = bad[:i]
    decoder = p.FrameDecoder()
    got = decoder.feed(bytes(bad) + p.encode_frame(*second))
    assert (got[-1].seq, got[-1].type, got[-1].payload) == second
    assert len(got) <= 2
    if len(got) == 1 and len(bad) > 1:
        assert decoder.stats.errors >= 1


@fuzz(1000)
@given(
    st.integers(0, 2),
    st.integers(0, 1000),
    st.integers(-(2**31), 2**31 - 1),
    st.integers(-(2**31), 2**31 - 1),
    st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=64),
    st.integers(0, 255),
)
def test_message_fields_round_trip(
    mode: int, current: int, x: int, y: int, text: str, seq: int
) -> None:
    decoder = p.MessageDecoder()
    msgs = [
        p.SetIllumination(mode, current),
        p.MoveAbs(x, y, 0),
        p.MoveRel(y, x, -1),
        p.Nack(int(p.MsgType.HOME), int(p.ErrorCode.BUSY), text),
        p.HelloReply(1, 1, 0, 0, 0xFF, 1, 1, 1, 1, x, y, 0, 0, 0, 0, text),
    ]
    wire = b"".join(m.encode(seq) for m in msgs)
    assert decoder.feed(wire) == [(seq, m) for m in msgs]
