"""Test support for the data loop: an archive with results (spectra on the device axis) and
verdicts written straight into the ``reviews`` table."""

from __future__ import annotations

import uuid
from typing import Any

import numpy as np
from collector_support import make_result
from sqlalchemy import Engine, insert

from deploy.collector.db import migrate, open_engine
from deploy.collector.store import ArchiveStore, utcnow
from deploy.collector.tables import reviews, study_slides
from inference.spectrum import axis_nm, parse_params

AXIS = axis_nm(parse_params(None))
VERDICT = {"II": "NILM", "III": "LSIL", "IV": "HSIL", "V": "SCC"}


def spectrum(group: str, rng: np.random.Generator, shift_nm: float = 0.0) -> dict[str, Any]:
    """A spectrum on the device's axis: a peak whose place depends on the group, plus noise.

    ``shift_nm`` moves the whole spectrum along the axis (a miscalibrated instrument)."""
    centre = {"II": -20.0, "III": -10.0, "IV": 10.0, "V": 20.0}[group] + shift_nm
    y = np.exp(-0.5 * ((AXIS - centre) / 15.0) ** 2) + rng.normal(0, 0.02, AXIS.size)
    return {"algorithm": "omis-wdiff-v1", "axis": AXIS.tolist(), "values": y.tolist()}


def open_archive(url: str) -> tuple[Engine, ArchiveStore]:
    """A migrated archive and its store."""
    engine = open_engine(url)
    migrate(engine)
    return engine, ArchiveStore(engine, high_risk_alerts=False)


def add_scan(
    store: ArchiveStore,
    seq: int,
    group: str,
    rng: np.random.Generator,
    *,
    p_high: float,
    shift_nm: float = 0.0,
    day: int = 1,
    model: tuple[str, int] = ("omis-test", 4),
    spectrum_json: dict[str, Any] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """Store one result of a slide of ``group``; returns the payload."""
    abstained = bool(extra.pop("abstained", False))
    result = make_result(
        seq,
        slide=extra.pop("slide", f"S-{seq:04d}"),
        p_high=p_high,
        abstained=abstained,
        finished_at=f"2026-01-{day:02d}T12:{seq // 60 % 60:02d}:{seq % 60:02d}.000Z",
        **extra,
    )
    result["spectrum"] = spectrum_json or spectrum(group, rng, shift_nm)
    result["model"] = {"name": model[0], "version": model[1], "sha256": "cd" * 32}
    result["prediction"]["p_high"] = p_high
    if abstained:
        result["outcome"], result["reason"] = "abstained", "uncertain_probability"
    store.add_result(result)
    return result


def sign_out(
    engine: Engine, result: dict[str, Any], bethesda: str, adequacy: str = "satisfactory"
) -> None:
    """A verdict row, as the review endpoint writes it."""
    with engine.begin() as conn:
        conn.execute(
            insert(reviews).values(
                message_id=result["message_id"], slide_id=result["slide_id"], bethesda=bethesda,
                adequacy=adequacy, comment="", user_name="ct", role="cytotech",
                created_at=utcnow(), supersedes=None,
            )
        )  # fmt: skip


def set_patient(engine: Engine, slide_id: str, patient: str, site: str = "") -> None:
    """Study fields of one slide."""
    with engine.begin() as conn:
        conn.execute(
            insert(study_slides).values(
                slide_id=slide_id, patient_id=patient, site=site, reference="cytology",
                updated_at=utcnow(),
            )
        )  # fmt: skip


def new_id() -> str:
    """A message id."""
    return str(uuid.uuid4())


def simulator_spectra(seed: int, first: int, n: int) -> list[tuple[str, Any, Any]]:
    """(Pap group, x_nm, y) of simulated slides ``first..first+n-1``: one 160x128 field each
    through the device's spectrum code (slides whose field fails QC are skipped)."""
    from firmware_bridge.sim.sample import slide_for
    from inference.exceptions import SpectrumInputError
    from inference.spectrum.qc import compute_slide_spectrum

    params = parse_params(None)
    out = []
    for i in range(first, first + n):
        slide = slide_for(i, seed)
        x, y = slide.field_positions(1)[0]
        try:
            s = compute_slide_spectrum([slide.render_pair(x, y, (160, 128))], params, "numpy")
        except SpectrumInputError:
            continue
        out.append((slide.pap_group, s.spectrum.x_nm, s.spectrum.y))
    return out
