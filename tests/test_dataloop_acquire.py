"""``omis acquire --label --patient``: a study set built by hand, read by training as it is."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from deploy.cli import main
from training.data import read_manifest


def _acquire(root: Path, name: str, *extra: str) -> int:
    argv = ["acquire", "--microscope", "sim://?seed=3", "--fields", "2", "--size", "160x128"]
    return main([*argv, "--out", str(root / name), "-q", *extra])


def test_labelled_acquisitions_append_to_one_manifest(tmp_path: Path) -> None:
    assert _acquire(tmp_path, "slide-a", "--label", "IV", "--patient", "P-1") == 0
    assert _acquire(tmp_path, "slide-b", "--label", "pap2", "--patient", "P-2") == 0
    with (tmp_path / "manifest.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert [(r["slide_id"], r["patient_id"], r["pap_group"]) for r in rows] == [
        ("slide-a", "P-1", "IV"), ("slide-a", "P-1", "IV"),
        ("slide-b", "P-2", "II"), ("slide-b", "P-2", "II"),
    ]  # fmt: skip
    assert rows[0]["diffuse"] == "slide-a/field-000-diffuse.png"
    kind, slides, _ = read_manifest(tmp_path)
    assert kind == "fields" and [s.slide_id for s in slides] == ["slide-a", "slide-b"]


def test_bad_labels_fail_before_the_microscope_is_used(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _acquire(tmp_path, "s", "--label", "VI", "--patient", "P") == 1
    assert "unknown Pap group" in capsys.readouterr().err
    assert _acquire(tmp_path, "s", "--label", "II") == 1
    assert "--patient" in capsys.readouterr().err
    assert not (tmp_path / "s").exists() and not (tmp_path / "manifest.csv").exists()
    assert _acquire(tmp_path, "s", "--label", "II", "--patient", "P") == 0
    assert _acquire(tmp_path, "t", "--label", "II", "--patient", "P", "--slide-id", "s") == 1
    assert "already listed" in capsys.readouterr().err
