"""Slide id -> simulated slide: the one mapping every entry point uses.

``sim<seed>-NNNN`` (written by :func:`~firmware_bridge.sim.sample.slide_id_for`) is slide NNNN
of the synthetic dataset with that seed, exactly as ``omis dataset synth`` writes it.  Any other
id (or a dataset id of another seed) gets a deterministic slide of its own: its Pap group is
drawn in the study's proportions from the id, so the same id is the same slide whether it comes
from ``sim://?slide=ID``, ``omis scan --slide-id ID`` or ``cmd/scan``.  ``group`` forces the Pap
group (``sim://?group=IV``) and keeps the slide's cells.
"""

from __future__ import annotations

import re
import zlib

from firmware_bridge.sim.sample import SyntheticSlide, slide_for

SIM_ID_RE = re.compile(r"sim(\d+)-(\d+)")
ID_SLIDES = 100_000  # dataset indices an arbitrary id is hashed onto


def dataset_index(slide_id: str, seed: int) -> int | None:
    """The dataset index of ``sim<seed>-NNNN`` for this ``seed``, else None."""
    match = SIM_ID_RE.fullmatch(slide_id)
    if match is None or int(match.group(1)) != seed:
        return None
    return int(match.group(2))


def slide_by_id(slide_id: str, seed: int, group: str | None = None) -> SyntheticSlide:
    """The simulated slide named ``slide_id`` under a ``sim://?seed=seed`` microscope."""
    index = dataset_index(slide_id, seed)
    if index is not None and group is None:
        return slide_for(index, seed)
    like = slide_for(
        index if index is not None else zlib.crc32(slide_id.encode()) % ID_SLIDES, seed
    )
    return SyntheticSlide(slide_id, group or like.pap_group, like.seed)
