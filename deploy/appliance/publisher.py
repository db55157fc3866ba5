"""The result publisher seam: where a finished slide's :class:`ResultMessage` goes.

:class:`OutboxPublisher` is the real one: the result is committed to the durable SQLite outbox
(and from there the :class:`~deploy.mqtt.OutboxPump` publishes it over the MQTT link until the
broker's PUBACK); :class:`MemoryPublisher` keeps results in a list, for logic tests.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

from deploy.appliance.results import ResultMessage
from deploy.exceptions import OutboxFullError, SchemaError
from deploy.outbox import Outbox
from deploy.schemas import validate

log = logging.getLogger(__name__)

OUTBOX_FULL_RETRY_S = 1.0


class _Outgoing(Protocol):
    @property
    def message_id(self) -> str: ...

    def to_json(self) -> dict[str, Any]: ...

    def payload(self) -> bytes: ...


def store_durably(
    outbox: Outbox,
    topic: str,
    schema: str,
    message: _Outgoing,
    on_error: Callable[[str, str], None],
) -> None:
    """Check ``message`` against its shipped schema, then put it in the outbox, waiting for
    room (never dropping it).  A schema mismatch is reported (``<schema>_invalid``) and the
    message kept anyway: one the dashboard may reject beats a lost slide."""
    try:
        validate(schema, message.to_json())
    except SchemaError as exc:
        on_error(f"{schema}_invalid", str(exc))
        log.error("%s %s does not match its schema: %s", schema, message.message_id, exc)
    payload = message.payload()
    while True:
        try:
            outbox.put(message.message_id, topic, payload)
            return
        except OutboxFullError as exc:
            # Admission control makes this rare; wait for room, never drop.
            on_error("outbox_full", str(exc))
            time.sleep(OUTBOX_FULL_RETRY_S)


class ResultPublisher(Protocol):
    """Takes results; :meth:`commit` returns once the result is safe (never drops one)."""

    def commit(self, result: ResultMessage) -> None:
        """Store ``result`` for delivery; blocks while there is no room."""
        ...


class OutboxPublisher:
    """Results into the durable outbox, for the MQTT link to deliver."""

    def __init__(
        self,
        outbox: Outbox,
        topic: str,
        notify: Callable[[], None],
        on_error: Callable[[str, str], None],
    ) -> None:
        self.outbox = outbox
        self.topic = topic
        self.notify = notify
        self.on_error = on_error  # (code, message): shown in the status

    def commit(self, result: ResultMessage) -> None:
        """Validate against the shipped schema, then store (waiting for room, never dropping)."""
        store_durably(self.outbox, self.topic, "result", result, self.on_error)
        log.info(
            "result %s (slide %s, seq %d, %s) committed",
            result.message_id,
            result.slide_id,
            result.seq,
            result.outcome.value,
        )
        self.notify()


class MemoryPublisher:
    """Results kept in memory (tests)."""

    def __init__(self) -> None:
        self.results: list[ResultMessage] = []
        self._lock = threading.Lock()

    def commit(self, result: ResultMessage) -> None:
        """Append ``result``."""
        with self._lock:
            self.results.append(result)
