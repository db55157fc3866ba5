"""Archive -> ``omis dataset export`` -> ``omis train`` -> ``omis validate`` (locked), end to end,
and validation's bad inputs."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from dataloop_support import AXIS, VERDICT, add_scan, open_archive, sign_out

from deploy.cli import main
from training.validate import Scored, figures, sample_size

GROUPS = ("II", "III", "IV", "V")


@pytest.fixture(scope="module")
def loop(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A trained spectrum1d bundle from one export, and a later export to validate it on."""
    root = tmp_path_factory.mktemp("loop")
    url = f"sqlite:///{root / 'archive.sqlite'}"
    engine, store = open_archive(url)
    rng = np.random.default_rng(0)
    for i in range(1, 33):  # day 1: the training slides
        g = GROUPS[i % 4]
        sign_out(engine, add_scan(store, i, g, rng, p_high=0.5, day=1), VERDICT[g])
    for i in range(40, 56):  # day 2: new slides, after the model was trained
        g = GROUPS[i % 4]
        sign_out(engine, add_scan(store, i, g, rng, p_high=0.5, day=2), VERDICT[g])
    # a spectrum unlike anything in training: its mass sits at the end of the axis
    odd = add_scan(store, 60, "II", rng, p_high=0.5, day=2)
    engine.dispose()
    _edge_spectrum(url, odd["message_id"])
    train_dir, test_dir = root / "train-data", root / "test-data"
    base = ["dataset", "export", "--db", url]
    assert main([*base, "--out", str(train_dir), "--until", "2026-01-02T00:00:00Z"]) == 0
    engine, _ = open_archive(url)
    sign_out(engine, odd, "NILM")
    engine.dispose()
    assert main([*base, "--out", str(test_dir), "--since", "2026-01-02T00:00:00Z"]) == 0
    out = root / "model"
    argv = ["train", "--data", str(train_dir), "--out", str(out), "--preset", "spectrum1d"]
    assert main([*argv, "--folds", "2", "--epochs", "4", "-q"]) == 0
    return {"train": train_dir, "test": test_dir, "model": out, "bundle": out / "bundle"}


def _edge_spectrum(url: str, message_id: str) -> None:
    from sqlalchemy import update

    from deploy.collector.db import open_engine
    from deploy.collector.tables import results

    engine = open_engine(url)
    with engine.begin() as conn:
        payload = json.loads(
            conn.execute(results.select().where(results.c.message_id == message_id)).one().payload
        )
        y = np.exp(-0.5 * ((AXIS - 140.0) / 3.0) ** 2)
        payload["spectrum"]["values"] = y.tolist()
        conn.execute(
            update(results)
            .where(results.c.message_id == message_id)
            .values(payload=json.dumps(payload))
        )
    engine.dispose()


def _validate(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, Any]:
    code = main(["validate", *argv, "--json", "-q"])
    out = capsys.readouterr()
    return code, (json.loads(out.out) if code == 0 else out.err.strip())


def test_training_records_the_export_hash(loop: dict[str, Path]) -> None:
    export = json.loads((loop["train"] / "export.json").read_text())
    config = json.loads((loop["model"] / "config.json").read_text())
    assert config["data"]["export"]["sha256"] == export["sha256"]
    assert config["data"]["files_sha256"] == export["sha256"]
    manifest = json.loads((loop["bundle"] / "manifest.json").read_text())
    ref = manifest["training"]["metrics"]["reference_distribution"]
    assert sum(ref["p_high"]["counts"]) == export["rows"]
    assert ref["spectral_centroid_nm"]["n"] == export["rows"]


def test_locked_validation_end_to_end(
    loop: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    code, report = _validate(capsys, "--bundle", str(loop["bundle"]), "--data", str(loop["test"]))
    assert code == 0
    lock = report["lock"]
    locked = json.loads(Path(lock["path"]).read_text())
    manifest = json.loads((loop["bundle"] / "manifest.json").read_text())
    assert locked["thresholds"] == manifest["thresholds"]
    export = json.loads((loop["test"] / "export.json").read_text())
    assert locked["data"]["files_sha256"] == export["sha256"]
    slides = {s["slide_id"]: s for s in report["slides"]}
    assert len(slides) == export["rows"] == 17
    assert set(slides["S-0060"]) >= {"slide_id", "truth", "outcome", "call", "p_high"}
    # the device's out_of_range check: the odd spectrum is referred, whatever p(high) says
    assert slides["S-0060"]["outcome"] == "abstained"
    assert slides["S-0060"]["reason"] == "out_of_range"
    assert slides["S-0060"]["call"] == "refer"
    # the figures follow from the per-slide outcomes
    decided = [s for s in report["slides"] if s["outcome"] == "classified"]
    tp = sum(1 for s in decided if s["truth"] == "high" and s["call"] == "high")
    pos = sum(1 for s in decided if s["truth"] == "high")
    assert report["sensitivity"]["successes"] == tp and report["sensitivity"]["n"] == pos
    referred = sum(1 for s in report["slides"] if s["outcome"] == "abstained")
    assert report["referral_rate"]["value"] == pytest.approx(referred / 17)
    assert report["roc_auc"]["method"] == "DeLong"
    # a second run checks the lock and cites the same one
    code, again = _validate(capsys, "--bundle", str(loop["bundle"]), "--data", str(loop["test"]))
    assert code == 0 and again["lock"]["sha256"] == lock["sha256"]


def test_a_lock_that_does_not_match_is_refused(
    loop: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    lock = tmp_path / "lock.json"
    args = ["--bundle", str(loop["bundle"]), "--lock", str(lock)]
    assert _validate(capsys, *args, "--data", str(loop["test"]))[0] == 0
    before = lock.read_bytes()
    code, err = _validate(capsys, *args, "--data", str(loop["train"]))  # other data
    assert code == 1 and len(err.splitlines()) == 1 and "data" in err and "lock" in err
    record = json.loads(before)
    record["thresholds"]["decision"] = 0.01  # an operating point moved after the lock
    lock.write_text(json.dumps(record))
    code, err = _validate(capsys, *args, "--data", str(loop["test"]))
    assert code == 1 and "thresholds" in err
    assert json.loads(lock.read_text())["thresholds"]["decision"] == 0.01  # left as it was


def test_spectra_on_another_axis_are_refused_before_any_lock(
    loop: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "spectra").mkdir()
    rows = list(csv.DictReader((loop["test"] / "manifest.csv").open()))
    for row in rows:
        x = np.linspace(-100.0, 100.0, 64)
        lines = ["x_nm,y"] + [f"{a},{b}" for a, b in zip(x, np.exp(-((x / 20) ** 2)), strict=True)]
        (data / row["spectrum"]).write_text("\n".join(lines))
    with (data / "manifest.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    code, err = _validate(capsys, "--bundle", str(loop["bundle"]), "--data", str(data))
    assert code == 1 and len(err.splitlines()) == 1
    assert "axis" in err
    assert not (data / "validation-locks").exists()


def test_an_empty_data_directory_is_one_line(
    loop: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, err = _validate(capsys, "--bundle", str(loop["bundle"]), "--data", str(tmp_path))
    assert code == 1 and len(err.splitlines()) == 1 and "manifest.csv" in err


def test_plan_gives_the_slides_needed(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--plan", "--sensitivity", "0.85", "--margin", "0.05", "--prevalence", "0.43"]
    assert main(["validate", *argv]) == 0
    assert capsys.readouterr().out.startswith("456 slides needed: 196 high-risk slides")
    plan = sample_size(0.85, 0.05, 0.43, specificity=0.9)
    assert plan["negatives_needed"] == 139 and plan["slides"] == 456
    assert main(["validate", "--plan", "--sensitivity", "1.2", "--margin", "0.05",
                 "--prevalence", "0.4"]) == 1  # fmt: skip


def test_patient_level_figures_and_cluster_bootstrap() -> None:
    def s(slide: str, patient: str, group: str, call: str) -> Scored:
        outcome = "abstained" if call == "refer" else "classified"
        return Scored(slide, patient, "", group, outcome, None, call, 0.5)

    scored = [
        s("a1", "A", "IV", "low"), s("a2", "A", "IV", "high"),  # patient A found by a2
        s("b1", "B", "II", "low"), s("b2", "B", "II", "refer"),  # B referred: a positive call
        s("c1", "C", "II", "low"), s("d1", "D", "V", "low"),
    ]  # fmt: skip
    f = figures(scored, {"IV", "V"})
    pl = f["patient_level"]
    assert pl["patients"] == 4
    assert (pl["sensitivity"]["successes"], pl["sensitivity"]["n"]) == (1, 2)
    assert (pl["specificity"]["successes"], pl["specificity"]["n"]) == (1, 2)
    assert len(pl["cluster_bootstrap"]["sensitivity_ci95"]) == 2
    assert f["sensitivity_with_referrals"]["n"] == 3
    assert f["specificity_with_referrals"]["successes"] == 2  # b2 counts as a positive call


def test_raw_field_datasets_go_through_the_device_qc_and_spectrum(
    loop: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "fields"
    argv = ["dataset", "synth", "--out", str(data), "--slides", "6", "--fields", "1"]
    assert main([*argv, "--size", "160x128", "--seed", "4", "--workers", "1", "-q"]) == 0
    capsys.readouterr()
    code, report = _validate(capsys, "--bundle", str(loop["bundle"]), "--data", str(data))
    assert code == 0
    assert report["data"]["kind"] == "fields" and report["n"] == 6
    outcomes = {s["outcome"] for s in report["slides"]}
    assert outcomes <= {"classified", "abstained", "failed"}
    for s in report["slides"]:
        assert (s["call"] is None) is (s["outcome"] == "failed")
