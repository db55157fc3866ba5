"""What every message model shares: strict parsing, RFC 3339 times, strict-JSON bytes."""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any, ClassVar

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from inference.result import strict_json

RFC3339_UTC = r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z$"
SCHEMA_BASE = "https://omis.example/schemas/"


def rfc3339(ts: dt.datetime | None = None) -> str:
    """UTC time as RFC 3339 with a ``Z`` suffix and milliseconds."""
    utc = dt.timezone.utc
    when = (ts or dt.datetime.now(utc)).astimezone(utc)
    return when.isoformat(timespec="milliseconds").replace("+00:00", "Z")


# A device without a real-time clock boots in 1970 and its results must still be archived;
# years far outside that (0001, 9999) overflow date arithmetic in consumers and databases.
YEARS = (1970, 9000)


def _real_time(value: str) -> str:
    # The pattern admits 2026-13-45T99:00:00Z; a time must also be a date on the calendar.
    try:
        when = dt.datetime.fromisoformat(value)
    except ValueError as exc:
        raise ValueError(f"not a valid time: {value!r}") from exc
    if not YEARS[0] <= when.year < YEARS[1]:
        raise ValueError(f"time {value!r} is outside the years {YEARS[0]}-{YEARS[1] - 1}")
    return value


#: An RFC 3339 UTC time (``Z``) that is a real calendar date.
Timestamp = Annotated[str, Field(pattern=RFC3339_UTC, max_length=40), AfterValidator(_real_time)]


class Message(BaseModel):
    """Base of every message model: unknown keys refused, no NaN, immutable.

    ``\\Z`` in the identifier pattern needs Python's ``re`` (Rust's regex lacks it).
    """

    model_config = ConfigDict(
        extra="forbid", frozen=True, allow_inf_nan=False, regex_engine="python-re"
    )

    #: Keys written only when set (left out of the JSON when None).
    omit_when_none: ClassVar[tuple[str, ...]] = ()

    def to_json(self) -> dict[str, Any]:
        """The message as JSON data (aliases applied, unset optional keys left out)."""
        data = self.model_dump(mode="json", by_alias=True)
        for key in self.omit_when_none:
            if data.get(key) is None:
                data.pop(key, None)
        return data

    def payload(self) -> bytes:
        """The strict-JSON bytes published (no NaN or infinity can get through)."""
        return strict_json(self.to_json())
