"""Study metadata in training: leave-one-group-out folds, per-site figures, the export record."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from training.data import Slide
from training.exceptions import DataError
from training.study import by_study, group_values, study_folds


def _slides(sites: list[str]) -> list[Slide]:
    return [
        Slide(f"S{i}", f"P{i}", "II", study={"site": s, "device_id": f"d{i % 2}"} if s else {})
        for i, s in enumerate(sites)
    ]


def test_group_by_site_leaves_one_site_out() -> None:
    slides = _slides(["a", "a", "b", "b", "c", "c"])
    labels = np.array([0, 1, 0, 1, 0, 1], dtype=np.int64)
    folds = study_folds(labels, slides, "site", 5, 0)
    assert len(folds) == 3  # one per site, whatever --folds says
    for train, test in folds:
        test_sites = {slides[i].study["site"] for i in test}
        assert len(test_sites) == 1
        assert not test_sites & {slides[i].study["site"] for i in train}


def test_group_by_a_missing_column_names_the_slide() -> None:
    slides = _slides(["a", ""])
    with pytest.raises(DataError, match="'S1' has no site"):
        group_values(slides, "site")


def test_by_study_gives_per_site_figures() -> None:
    slides = _slides(["a", "a", "b", "b"])
    positive = np.array([True, False, True, False])
    called = np.array([True, False, False, False])
    figures = by_study(slides, positive, called)
    assert figures is not None
    assert figures["site"]["a"]["sensitivity"]["value"] == 1.0
    assert figures["site"]["b"]["sensitivity"]["value"] == 0.0
    assert set(figures["device_id"]) == {"d0", "d1"}
    assert by_study(_slides(["", ""]), positive[:2], called[:2]) is None


def test_unknown_reference_is_a_manifest_problem(tmp_path: Path) -> None:
    from training.data import read_manifest

    (tmp_path / "s.csv").write_text("1\n")
    (tmp_path / "manifest.csv").write_text(
        "slide_id,patient_id,pap_group,spectrum,reference\nS1,P1,II,s.csv,biopsy\n"
    )
    with pytest.raises(DataError, match="unknown reference 'biopsy'"):
        read_manifest(tmp_path)
