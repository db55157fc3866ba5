"""``--shadow-first``: judge a canary's shadow comparison from the archive database.

The candidate is named by its model sha256; the comparison is that of ``GET /api/shadow``
restricted to the one device (:meth:`deploy.collector.shadow.ShadowArchive.compare`), and the
criterion is :func:`deploy.collector.shadow.judge` (documented in docs/fleet.md).
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import Engine

from deploy.collector.shadow import Criterion, ShadowArchive, judge


@dataclass
class ArchiveJudge:
    """Reads the archive's shadow results of one candidate, device by device."""

    engine: Engine
    candidate_sha256: str
    criterion: Criterion

    def verdict(self, device_id: str) -> tuple[bool | None, str]:
        """``(None, why)`` until ``min_slides`` slides are compared, then ``(passed, why)``."""
        comparison = ShadowArchive(self.engine).compare(self.candidate_sha256, [device_id])
        paired = comparison["counts"]["paired"]
        if paired < self.criterion.min_slides:
            return None, f"{paired} of {self.criterion.min_slides} slides compared"
        return judge(comparison, self.criterion)
