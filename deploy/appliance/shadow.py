"""Shadow results on the device: the candidate's call beside each serving result.

The scan worker takes the scanner's :class:`~deploy.appliance.base.ShadowOutcome` of a slide
after committing the slide's ``omis.result/1`` and commits an ``omis.shadow/1`` message to the
same durable outbox, on ``<prefix>/<device>/shadow`` (so it is delivered like results, after a
restart too).  The serving result is built first and never depends on the shadow.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable

from deploy.appliance.base import ShadowOutcome
from deploy.appliance.publisher import store_durably
from deploy.appliance.results import Identity, rfc3339
from deploy.messages.result import ResultMessage
from deploy.messages.shadow import ShadowMessage
from deploy.outbox import Outbox
from inference.result import ModelRef, Outcome

log = logging.getLogger(__name__)

_DECIDED = (Outcome.CLASSIFIED, Outcome.ABSTAINED)


def build_shadow(
    identity: Identity, result: ResultMessage, shadow: ShadowOutcome
) -> ShadowMessage | None:
    """The ``omis.shadow/1`` of a slide, or None when the serving result is not a call
    (failed, cancelled: there is nothing to compare the candidate with)."""
    if result.outcome not in _DECIDED or result.model is None:
        return None
    report = shadow.report
    if report is None:
        outcome, reason, prediction, timings = "failed", shadow.error, None, {}
    else:
        outcome = report.outcome.value
        reason, prediction = report.reason, report.prediction
        timings = {k: report.timings_ms[k] for k in ("render", "preprocess", "infer", "total")}
    return ShadowMessage(
        message_id=str(uuid.uuid4()),
        serving_message_id=result.message_id,
        device_id=identity.device_id,
        slide_id=result.slide_id,
        scan_id=result.scan_id,
        finished_at=rfc3339(),
        candidate=ModelRef.model_validate(shadow.candidate),
        serving=result.model,
        outcome=outcome,
        reason=reason,
        prediction=prediction,
        serving_outcome=result.outcome.value,
        serving_label=result.prediction.label,
        timings_ms=timings,
        seq=result.seq,
    )


class ShadowPublisher:
    """Shadow results into the durable outbox (their own topic), for the MQTT link."""

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
        self.on_error = on_error
        self.committed = 0

    def commit(self, message: ShadowMessage) -> None:
        """Check against the shipped schema, then store (waiting for room, never dropping)."""
        store_durably(self.outbox, self.topic, "shadow", message, self.on_error)
        self.committed += 1
        log.info(
            "shadow %s of slide %s (%s v%d: %s) committed",
            message.message_id,
            message.slide_id,
            message.candidate.name,
            message.candidate.version,
            message.outcome,
        )
        self.notify()
