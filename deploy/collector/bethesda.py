"""The Bethesda System 2014 categories, their Pap group (Munich III, as the study's labels) and
the binary risk the device predicts.

Source of the correspondence: the Munich nomenclature III ↔ Bethesda table (Griesser et al.,
Frauenarzt 2013; German S3 guideline "Prävention des Zervixkarzinoms", 2017), collapsed to the
study's groups II–V; high risk = groups IV and V (the study's binary split).  docs/collector.md.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

Bethesda = Literal["NILM", "ASC-US", "LSIL", "ASC-H", "HSIL", "SCC", "AGC", "AIS", "adenocarcinoma"]
Risk = Literal["low", "high"]


class PapClass(NamedTuple):
    """A verdict's Pap group and binary risk."""

    pap_group: str
    risk: Risk


MAPPING: dict[str, PapClass] = {
    "NILM": PapClass("II", "low"),
    "ASC-US": PapClass("III", "low"),
    "LSIL": PapClass("III", "low"),
    "ASC-H": PapClass("IV", "high"),
    "HSIL": PapClass("IV", "high"),
    "AGC": PapClass("IV", "high"),
    "AIS": PapClass("V", "high"),
    "SCC": PapClass("V", "high"),
    "adenocarcinoma": PapClass("V", "high"),
}

CATEGORIES = tuple(MAPPING)


def pap_class(bethesda: str | None) -> PapClass | None:
    """The Pap group and risk of a Bethesda category (None for no category, e.g. unsatisfactory)."""
    if bethesda is None:
        return None
    try:
        return MAPPING[bethesda]
    except KeyError:
        raise ValueError(f"bethesda: unknown category {bethesda!r}") from None
