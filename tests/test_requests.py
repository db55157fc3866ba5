"""Unit tests of deploy.requests: bounded command parsing and where replies may go."""

from __future__ import annotations

import pytest

from deploy.requests import (
    MAX_JSON_DEPTH,
    RequestError,
    json_depth,
    parse_command,
    reply_prefix,
    reply_topics,
    response_topic_problem,
)

STD = "omis/v1/scope-08/cmd/status/reply"


@pytest.mark.parametrize(
    ("text", "depth"),
    [
        ("{}", 1),
        ('{"a": [1, {"b": []}]}', 4),
        ('{"s": "[[[[{{{{"}', 1),  # brackets inside strings do not count
        ('{"s": "\\"[[["}', 1),  # nor after an escaped quote
        ("[" * 10_000, 10_000),
        ("1", 0),
    ],
)
def test_json_depth(text: str, depth: int) -> None:
    assert json_depth(text) == depth


@pytest.mark.parametrize(
    ("payload", "code"),
    [
        (b"x" * 201, "too_large"),
        (b"[" * 50, "too_deep"),
        (b'{"a":' * (MAX_JSON_DEPTH + 1) + b"1" + b"}" * (MAX_JSON_DEPTH + 1), "too_deep"),
        (b"\xff\xfe", "malformed"),
        (b'{"x": NaN}', "malformed"),
        (b'{"x": -Infinity}', "malformed"),
        (b"[1, 2]", "malformed"),
        (b"{", "malformed"),
    ],
)
def test_parse_command_refusals(payload: bytes, code: str) -> None:
    with pytest.raises(RequestError) as info:
        parse_command(payload, max_bytes=200)
    assert info.value.code == code


def test_parse_command_accepts_a_normal_request() -> None:
    nested = b'{"a":' * (MAX_JSON_DEPTH - 1) + b"1" + b"}" * (MAX_JSON_DEPTH - 1)
    assert parse_command(b'{"slide_id": "S-1"}', 100) == {"slide_id": "S-1"}
    assert isinstance(parse_command(nested, 1000), dict)


@pytest.mark.parametrize(
    "topic",
    [
        "omis/v1/scope-08/result",
        "omis/v1/scope-08/status",
        "omis/v1/scope-08/availability",
        "omis/v1/scope-09/cmd/scan",
        "omis/v1/scope-08/reply",
        "omis/v1/scope-08/reply/",
        "omis/v1/scope-08/reply//x",
        "omis/v1/scope-08/reply/+",
        "omis/v1/scope-08/reply/#",
        "$SYS/x",
        "omis/v1/scope-08/reply/a\0b",
        "omis/v1/scope-08/reply/" + "x" * 300,
        "omis/v1/scope-08x/reply/u",
        "inbox/dash-1",
    ],
)
def test_response_topics_outside_the_reply_prefix_get_no_copy(topic: str) -> None:
    assert response_topic_problem(topic, "omis/v1", "scope-08") is not None
    topics, warning = reply_topics(STD, topic, "omis/v1", "scope-08")
    assert topics == [STD]
    assert warning is not None and "refused" in warning


def test_response_topic_under_the_prefix_gets_a_copy() -> None:
    inbox = reply_prefix("omis/v1", "scope-08") + "operator/req-1"
    assert inbox == "omis/v1/scope-08/reply/operator/req-1"
    assert reply_topics(STD, inbox, "omis/v1", "scope-08") == ([STD, inbox], None)
    assert reply_topics(STD, None, "omis/v1", "scope-08") == ([STD], None)
    assert reply_topics(STD, STD, "omis/v1", "scope-08") == ([STD], None)
