"""Install-time check that a bundle's field quality-control thresholds fit its own data.

A bundle carries the QC thresholds the device applies to every field (``manifest.qc``).
Thresholds that reject the bundle's own golden field pairs (fields its whole device path was
proven on) would leave the device with no usable field on ordinary slides: every slide
``no_usable_field``, the model never consulted, yet no error anywhere.  Such a bundle is refused
before it can serve:

* every golden field pair must pass the bundle's QC thresholds; and
* when the bundle records the share of its training fields that QC accepted
  (``training.operating_point.field_acceptance``), that share must be at least
  ``MIN_FIELD_ACCEPTANCE``.

:func:`check_qc_acceptance` is called by the OTA installer (:mod:`deploy.ota.install`) after the
signature and manifest checks; it needs no model and no torch.
"""

from __future__ import annotations

import logging

from firmware_bridge.exceptions import BridgeError
from firmware_bridge.images import read_rgb
from inference.bundle import Bundle
from inference.bundle_checks import golden_field_files
from inference.exceptions import BundleError, InferenceError
from inference.spectrum import parse_params
from inference.spectrum.qc import FieldQuality, assess_field

log = logging.getLogger(__name__)

#: Below this share of accepted training fields most slides would have too few usable fields.
MIN_FIELD_ACCEPTANCE = 0.5


class QCAcceptanceError(BundleError):
    """A bundle's QC thresholds reject its own golden fields or most of its training fields."""


def golden_field_quality(bundle: Bundle) -> list[FieldQuality]:
    """The bundle's QC verdict on each of its golden field pairs."""
    m = bundle.manifest
    try:
        params = parse_params(m.spectrum)
    except InferenceError as exc:
        raise BundleError(f"spectrum parameters: {exc}") from exc
    out = []
    for i in range(m.golden.fields):
        try:
            w, p = (read_rgb(bundle.root / name) for name in golden_field_files(i))
        except BridgeError as exc:
            raise BundleError(f"golden field {i}: {exc}") from exc
        out.append(assess_field(w, p, params, m.qc_thresholds, index=i))
    return out


def check_qc_acceptance(bundle: Bundle) -> None:
    """Raise :class:`QCAcceptanceError` unless the bundle's QC accepts its own data."""
    quality = golden_field_quality(bundle)
    rejected = [q for q in quality if not q.ok]
    if rejected:
        first = rejected[0]
        raise QCAcceptanceError(
            f"the bundle's QC thresholds reject {len(rejected)} of its {len(quality)} golden "
            f"field pair(s) (field {first.index}: {', '.join(first.reasons)}): the device would "
            "find no usable field"
        )
    op = bundle.manifest.training.operating_point
    accepted = None if op is None else op.field_acceptance
    if accepted is not None and accepted < MIN_FIELD_ACCEPTANCE:
        raise QCAcceptanceError(
            f"the bundle's QC accepted {accepted:.1%} of its training fields, "
            f"below {MIN_FIELD_ACCEPTANCE:.0%}"
        )
    log.debug("QC acceptance: %d golden field pair(s) pass", len(quality))
