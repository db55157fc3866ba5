"""The negative-rescreen draw: which classified-low results go to a person anyway.

A result is drawn when ``HMAC-SHA256(QC_KEY, message_id)``, read as a number in [0, 1) (its
``qc_rank``, stored with the result), is below ``review.qc_sample_share``: reproducible, blind
to the device's call and to time, and the same for every collector instance.
"""

from __future__ import annotations

import hmac

QC_KEY = b"omis-qc-sample/1"


def qc_rank(message_id: str) -> float:
    """``HMAC-SHA256(QC_KEY, message_id)``'s first 64 bits as a number in [0, 1)."""
    digest = hmac.digest(QC_KEY, message_id.encode(), "sha256")
    return int.from_bytes(digest[:8], "big") / 2**64
