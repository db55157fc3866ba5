"""The API's query and path parameters, each bounded before it reaches SQL.

New routes use these types (or bound their own the same way): the test
``tests/test_collector_http_hostile.py::test_every_parameter_in_the_document_is_bounded``
walks the OpenAPI document and fails on any parameter without bounds.

Every parameter is checked by FastAPI's validation, so anything out of range is one 422 whose
``detail[0].loc`` names the parameter (``["query", "since"]``): integers within what both
databases store, strings of printable characters (a NUL is an error on PostgreSQL and matched
everything on SQLite) no longer than the column they are compared with, times that are RFC 3339
with a zone and stay inside the representable range once converted to UTC.
"""

from __future__ import annotations

import re
from datetime import datetime, timezone
from typing import Annotated

from fastapi import Path, Query
from pydantic import BeforeValidator

# No C0 control characters (NUL, escape, newlines) and no DEL: nothing a person types in a
# filter, and a NUL is an error in PostgreSQL text.
PRINTABLE = r"^[^\x00-\x1f\x7f]*$"
MAX_OFFSET = 1_000_000_000  # far beyond any archive; well inside a 64-bit integer
MAX_TIME_CHARS = 40  # "2026-01-01T12:00:00.123456789+01:00" is 35
ID_CHARS = 64  # results.message_id / device_id columns
SLIDE_CHARS = 128  # results.slide_id column
RFC3339 = re.compile(
    r"(\d{4}-\d{2}-\d{2}[Tt]\d{2}:\d{2}):(\d{2})(\.\d+)?([Zz]|[+-]\d{2}:\d{2})", re.ASCII
)
# What the OpenAPI document promises: RFC 3339 date-times of the years 0001-9998, which stay
# representable whatever the offset (the years 0000 and 9999 may overflow once made UTC).
DOCUMENTED_TIME_PATTERN = r"^(?!0000|9999)\d{4}-"


def parse_query_time(value: object) -> datetime | None:
    """An RFC 3339 time with a zone as naive UTC; ``ValueError`` naming what is wrong."""
    if value is None or isinstance(value, datetime):
        return value
    text = str(value)
    if len(text) > MAX_TIME_CHARS:
        raise ValueError(f"at most {MAX_TIME_CHARS} characters")
    match = RFC3339.fullmatch(text)
    if match is None:
        raise ValueError("not an RFC 3339 time with a zone (2026-01-01T12:00:00Z)")
    minute, second, fraction, zone = match.groups()
    # RFC 3339 allows a leap second and any number of digits; Python takes 0-59 and 6 digits
    micro = (fraction or ".0")[1:7].ljust(6, "0")
    if second == "60":
        second, micro = "59", "999999"
    try:
        parsed = datetime.fromisoformat(
            f"{minute}:{second}.{micro}{zone.upper()}".replace("Z", "+00:00")
        )
    except ValueError:
        raise ValueError("not a valid date or time") from None
    try:
        return parsed.astimezone(timezone.utc).replace(tzinfo=None)
    except OverflowError:
        raise ValueError("out of range once converted to UTC") from None


def time_query(description: str) -> object:
    """A time query parameter's documentation and bounds (use with :data:`QueryTime`)."""
    return Query(
        description=f"{description} (RFC 3339 with a zone)",
        json_schema_extra={
            "format": "date-time",
            "maxLength": MAX_TIME_CHARS,
            "pattern": DOCUMENTED_TIME_PATTERN,
        },
    )


Since = Annotated[
    datetime | None,
    BeforeValidator(parse_query_time),
    time_query("finished at or after"),
]
Until = Annotated[datetime | None, BeforeValidator(parse_query_time), time_query("finished before")]
# A time parameter of another meaning: ``Annotated[QueryTime, time_query("created before")]``.
QueryTime = Annotated[datetime | None, BeforeValidator(parse_query_time)]
DeviceFilter = Annotated[
    str | None,
    Query(description="device id", min_length=1, max_length=ID_CHARS, pattern=PRINTABLE),
]
SlideFilter = Annotated[
    str | None,
    Query(
        description="slide id contains (case-insensitive)",
        max_length=SLIDE_CHARS,
        pattern=PRINTABLE,
    ),
]
Offset = Annotated[int, Query(ge=0, le=MAX_OFFSET, description="rows to skip")]
MessageId = Annotated[
    str,
    Path(
        description="the result's message_id",
        min_length=1,
        max_length=ID_CHARS,
        pattern=PRINTABLE,
    ),
]


def text_query(max_length: int, description: str, *, min_length: int = 0) -> object:
    """An optional free-text query parameter: printable, at most ``max_length`` characters
    (the column it is compared with)."""
    return Query(
        description=description, min_length=min_length, max_length=max_length, pattern=PRINTABLE
    )


def text_path(max_length: int, description: str) -> object:
    """A path parameter naming something stored: printable, 1 .. ``max_length`` characters."""
    return Path(description=description, min_length=1, max_length=max_length, pattern=PRINTABLE)


def int_query(low: int, high: int, description: str) -> object:
    """An integer query parameter within ``low`` .. ``high``."""
    return Query(ge=low, le=high, description=description)


def limit_query(page_limit: int) -> object:
    """``limit``: 1 .. the configured largest page."""
    return Query(ge=1, le=page_limit, description=f"page size (at most {page_limit})")
