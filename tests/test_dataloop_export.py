"""``omis dataset export``: the archive's signed-out slides as a training directory."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from collector_support import database_url, postgres_server  # noqa: F401
from dataloop_support import VERDICT, add_scan, open_archive, set_patient, sign_out

from deploy.cli import main
from inference.spectrum import parse_params
from training.data import load_dataset


def _archive(db_url: str) -> None:
    engine, store = open_archive(db_url)
    rng = np.random.default_rng(1)
    groups = ["II", "IV", "III", "V", "II", "IV"]
    for i, g in enumerate(groups, start=1):
        r = add_scan(store, i, g, rng, p_high=0.8 if g in ("IV", "V") else 0.1)
        sign_out(engine, r, VERDICT[g])
    # an amendment: the latest verdict wins (slide 1 becomes HSIL, group IV)
    first = add_scan(store, 20, "II", rng, p_high=0.1, slide="S-0001")
    sign_out(engine, first, "HSIL")
    add_scan(store, 7, "II", rng, p_high=0.1)  # never signed out
    bad = add_scan(store, 8, "II", rng, p_high=0.1)
    sign_out(engine, bad, "NILM", adequacy="unsatisfactory")
    failed = add_scan(store, 9, "II", rng, p_high=0.1, outcome="failed", stage="acquire")
    sign_out(engine, failed, "NILM")
    other = add_scan(store, 10, "V", rng, p_high=0.9, device="scope-08", boot="b2", day=2)
    sign_out(engine, other, "SCC")
    set_patient(engine, "S-0002", "P-7", site="lab-north")
    engine.dispose()


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def test_export_writes_a_directory_training_reads(
    db_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _archive(db_url)
    out = tmp_path / "export"
    assert main(["dataset", "export", "--db", db_url, "--out", str(out), "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    manifest = {r["slide_id"]: r for r in _rows(out / "manifest.csv")}
    assert sorted(manifest) == [f"S-{i:04d}" for i in (1, 2, 3, 4, 5, 6, 10)]
    assert manifest["S-0001"]["pap_group"] == "IV"  # the amendment
    assert manifest["S-0001"]["bethesda"] == "HSIL"
    assert manifest["S-0002"]["patient_id"] == "P-7"
    assert manifest["S-0002"]["site"] == "lab-north"
    assert manifest["S-0003"]["patient_id"] == "S-0003"  # no study record: its own patient
    for column in ("device_id", "site", "acquired_at", "model_version", "reference"):
        assert column in manifest["S-0004"]
    assert manifest["S-0004"]["reference"] == "cytology"
    excluded = {r["slide_id"]: r["reason"] for r in _rows(out / "excluded.csv")}
    assert excluded["S-0007"].startswith("no verdict")
    assert excluded["S-0008"] == "unsatisfactory specimen"
    assert excluded["S-0009"].startswith("failed scan")
    assert record["rows"] == 7 and record["excluded"] == 3
    assert record["query"]["reviewed_only"] is True
    # training reads it as it is, and the digest it records is the export's
    ds = load_dataset(out, parse_params(None))
    assert ds.kind == "spectra" and len(ds.slides) == 7
    assert ds.files_sha256 == record["sha256"]
    assert ds.slides[1].study["site"] == "lab-north"
    assert not list(tmp_path.glob(".export.*")), "temporary directory left behind"


def test_export_filters_by_device_and_time(db_url: str, tmp_path: Path) -> None:
    _archive(db_url)
    out = tmp_path / "e"
    args = ["dataset", "export", "--db", db_url, "--out", str(out)]
    assert main([*args, "--until", "2026-01-01T12:00:04Z", "--device", "scope-07"]) == 0
    assert [r["slide_id"] for r in _rows(out / "manifest.csv")] == ["S-0001", "S-0002", "S-0003"]
    out2 = tmp_path / "e2"
    args = ["dataset", "export", "--db", db_url, "--out", str(out2)]
    assert main([*args, "--since", "2026-01-02T00:00:00Z", "--device", "scope-08"]) == 0
    assert [r["slide_id"] for r in _rows(out2 / "manifest.csv")] == ["S-0010"]


def test_export_of_an_empty_archive_fails_and_writes_nothing(
    db_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    engine, _ = open_archive(db_url)
    engine.dispose()
    out = tmp_path / "export"
    assert main(["dataset", "export", "--db", db_url, "--out", str(out)]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "nothing to export" in err
    assert not out.exists()
    assert not any(p.name.startswith(".export") for p in tmp_path.iterdir())


def test_contradictory_verdicts_for_one_patient_fail_and_write_nothing(
    db_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    engine, store = open_archive(db_url)
    rng = np.random.default_rng(2)
    a = add_scan(store, 1, "II", rng, p_high=0.1)
    b = add_scan(store, 2, "IV", rng, p_high=0.9)
    sign_out(engine, a, "NILM")
    sign_out(engine, b, "HSIL")
    set_patient(engine, a["slide_id"], "P-1")
    set_patient(engine, b["slide_id"], "P-1")
    engine.dispose()
    out = tmp_path / "export"
    assert main(["dataset", "export", "--db", db_url, "--out", str(out)]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "'P-1'" in err and "contradictory" in err
    assert not out.exists()
    assert not any(p.name.startswith(".export") for p in tmp_path.iterdir())


def test_export_reads_only(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nope.sqlite"
    args = ["dataset", "export", "--db", f"sqlite:///{missing}", "--out", str(tmp_path / "o")]
    assert main(args) == 1
    assert "no such archive database file" in capsys.readouterr().err
    assert not missing.exists()
