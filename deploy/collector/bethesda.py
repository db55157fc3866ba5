"""The Bethesda System (2014) categories, their Pap group and screening risk.

The mapping follows the usual correspondence of the Bethesda categories with the Papanicolaou
groups (Nayar & Wilbur, *The Bethesda System for Reporting Cervical Cytology*, 3rd ed., 2015;
Munich nomenclature III for the Pap groups): negative is group II, the low-grade and
undetermined squamous categories group III, the high-grade and glandular ones group IV, and
carcinoma group V.  "High risk" (positive) is group IV and V, as in the study and in training.
"""

from __future__ import annotations

from typing import Literal

Risk = Literal["low", "high"]

# category -> (Pap group, risk)
BETHESDA: dict[str, tuple[str, Risk]] = {
    "NILM": ("II", "low"),
    "ASC-US": ("III", "low"),
    "LSIL": ("III", "low"),
    "ASC-H": ("IV", "high"),
    "HSIL": ("IV", "high"),
    "AGC": ("IV", "high"),
    "AIS": ("V", "high"),
    "SCC": ("V", "high"),
    "adenocarcinoma": ("V", "high"),
}
ADEQUACY = ("satisfactory", "unsatisfactory")


def pap_group(bethesda: str) -> str:
    """The Pap group of a Bethesda category; ``ValueError`` naming the known ones."""
    try:
        return BETHESDA[bethesda][0]
    except KeyError:
        raise ValueError(
            f"unknown Bethesda category {bethesda!r} (known: {', '.join(BETHESDA)})"
        ) from None


def risk(bethesda: str) -> Risk:
    """``high`` or ``low`` for a Bethesda category; ``ValueError`` on an unknown one."""
    pap_group(bethesda)
    return BETHESDA[bethesda][1]
