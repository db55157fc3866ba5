"""``omis dataset synth`` end to end, through the real console entry point in a subprocess."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from deploy.cli import main
from firmware_bridge.exceptions import InputError
from firmware_bridge.images import read_rgb
from firmware_bridge.sim import dataset as ds
from firmware_bridge.sim.sample import PAP_GROUPS

TINY = ["--slides", "6", "--fields", "2", "--size", "160x128", "--seed", "5"]


def _omis(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "deploy.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def _tree(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def test_synth_writes_pairs_manifest_and_description(tmp_path: Path) -> None:
    out = tmp_path / "data"
    res = _omis("dataset", "synth", "--out", str(out), *TINY, "--workers", "2", "--json")
    assert res.returncode == 0, res.stderr
    summary = json.loads(res.stdout)
    assert summary["slides"] == 6 and summary["images"] == 24
    assert summary["counts"] == {"II": 2, "III": 1, "IV": 1, "V": 2}

    with (out / "manifest.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 12
    assert {"slide_id", "patient_id", "pap_group", "field", "diffuse", "polarized"} <= set(rows[0])
    assert sorted({r["slide_id"] for r in rows}) == sorted({r["slide_id"] for r in rows[::2]})
    groups = {r["slide_id"]: r["pap_group"] for r in rows}
    assert sorted(groups.values()) == sorted(["II", "II", "III", "IV", "V", "V"])
    for r in rows:
        w, p = read_rgb(out / r["diffuse"]), read_rgb(out / r["polarized"])
        assert w.shape == p.shape == (128, 160, 3)
        assert r["diffuse"] == f"{r['slide_id']}/field-{int(r['field']):03d}-diffuse.png"
        assert r["pap_group"] in PAP_GROUPS
    desc = json.loads((out / "dataset.json").read_text())
    assert desc["seed"] == 5 and desc["counts"] == summary["counts"]
    assert desc["generator"].startswith("omis-sim-")
    assert desc["config"]["difficulty"] == 1.0
    assert not list(tmp_path.glob(".*partial"))
    assert "synth slides" in res.stderr  # the progress bar goes to stderr


def test_same_seed_is_byte_identical_whatever_the_workers(tmp_path: Path) -> None:
    def run(name: str, seed: int, workers: int) -> dict[str, bytes]:
        req = ds.SynthRequest(
            out=tmp_path / name, slides=3, fields=1, size=(96, 64), seed=seed, workers=workers
        )
        ds.synthesize(req)
        return _tree(tmp_path / name)

    a, b, c = run("a", 9, 1), run("b", 9, 2), run("c", 10, 1)
    assert a == b
    assert a != c


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--slides", "0"], "--slides must be >= 1"),
        (["--slides", "3", "--groups", "II=1,VI=2"], "unknown Pap group 'VI'"),
        (["--slides", "3", "--groups", "II"], "expected GROUP=COUNT"),
        (["--slides", "3", "--size", "160by128"], "bad size"),
        (["--slides", "3", "--size", "0x128"], "out of range"),
        (["--slides", "3", "--difficulty", "-1"], "difficulty"),
        (["--slides", "3", "--difficulty", "harder"], "bad --difficulty 'harder'"),
        (["--slides", "3", "--workers", "0"], "--workers must be >= 1, got 0"),
    ],
)
def test_bad_arguments_give_one_line(
    tmp_path: Path, extra: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "data"
    code = main(["dataset", "synth", "--out", str(out), *extra])
    assert code == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert message in lines[0]
    assert not out.exists()
    assert not list(tmp_path.iterdir())


def test_refuses_a_non_empty_out_but_fills_an_empty_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("mine")
    assert main(["dataset", "synth", "--out", str(full), *TINY]) == 1
    assert "not an empty directory" in capsys.readouterr().err
    assert [p.name for p in full.iterdir()] == ["keep.txt"]
    empty = tmp_path / "empty"
    empty.mkdir()
    req = ds.SynthRequest(out=empty, slides=2, fields=1, size=(64, 48))
    result = ds.synthesize(req)
    assert (empty / "manifest.csv").is_file() and result.images == 4


def test_a_failure_leaves_nothing_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real = ds._render_slide

    def flaky(job: ds._SlideJob) -> list[dict[str, str]]:
        calls.append(job.index)
        if job.index == 2:
            raise InputError("disk on fire")
        return real(job)

    monkeypatch.setattr(ds, "_render_slide", flaky)
    req = ds.SynthRequest(out=tmp_path / "data", slides=4, fields=1, size=(64, 48))
    with pytest.raises(InputError, match="disk on fire"):
        ds.synthesize(req)
    assert calls == [0, 1, 2]
    assert list(tmp_path.iterdir()) == []


def test_groups_option_sets_the_proportions(tmp_path: Path) -> None:
    req = ds.SynthRequest(
        out=tmp_path / "d", slides=4, fields=1, size=(64, 48), groups=ds.parse_groups("II=1,V=1")
    )
    result = ds.synthesize(req)
    assert result.counts == {"II": 2, "III": 0, "IV": 0, "V": 2}
    with (tmp_path / "d" / "manifest.csv").open(newline="") as fh:
        assert sorted(r["pap_group"] for r in csv.DictReader(fh)) == ["II", "II", "V", "V"]
    img = read_rgb(tmp_path / "d" / "sim0-0000" / "field-000-diffuse.png")
    assert img.shape == (48, 64, 3) and np.ptp(img) > 0


def test_study_difficulty_preset_is_recorded_and_deterministic(tmp_path: Path) -> None:
    def run(name: str) -> dict[str, bytes]:
        args = ["--out", str(tmp_path / name), *TINY, "-q", "--difficulty", "study"]
        code = main(["dataset", "synth", *args])
        assert code == 0
        return _tree(tmp_path / name)

    a, b = run("a"), run("b")
    assert a == b
    desc = json.loads(a["dataset.json"])
    assert desc["difficulty_preset"] == "study"
    for knob, value in ds.DIFFICULTY_PRESETS["study"].items():
        assert desc["config"][knob] == value
    plain = ds.SynthRequest(out=tmp_path / "plain", slides=1, fields=1, size=(64, 48))
    ds.synthesize(plain)
    assert (
        json.loads((tmp_path / "plain" / "dataset.json").read_text())["difficulty_preset"] is None
    )


def test_a_number_and_a_preset_name_both_parse() -> None:
    assert ds.parse_difficulty("1.5") == ({"difficulty": 1.5}, None)
    assert ds.parse_difficulty("study") == (dict(ds.DIFFICULTY_PRESETS["study"]), "study")
    with pytest.raises(InputError, match=r"bad --difficulty 'hard'.*preset \(default, study\)"):
        ds.parse_difficulty("hard")


def test_a_preset_that_disagrees_with_the_config_is_refused(tmp_path: Path) -> None:
    req = ds.SynthRequest(
        out=tmp_path / "d",
        slides=1,
        config=ds.make_config(difficulty=4.0),
        difficulty_preset="study",
    )
    with pytest.raises(InputError, match="difficulty preset 'study' needs"):
        ds.synthesize(req)
    assert not (tmp_path / "d").exists()
