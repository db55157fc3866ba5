"""``availability``: plain UTF-8 text (not JSON), retained: online / stopped / offline."""

from __future__ import annotations

from pydantic import RootModel

from deploy.messages.vocabulary import AvailabilityValue


class Availability(RootModel[AvailabilityValue]):
    """``online`` on every (re)connect, ``stopped`` on a clean exit, ``offline`` as the will."""

    def payload(self) -> bytes:
        """The bytes published (the bare word)."""
        return self.root.encode("utf-8")
