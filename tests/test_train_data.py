"""Dataset manifests, the spectrum cache, and patient-grouped folds."""

from __future__ import annotations

import csv
import logging
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from firmware_bridge.images import read_rgb, write_png
from firmware_bridge.sim.sample import slide_for
from inference.spectrum import parse_params
from training.data import TASKS, load_dataset
from training.evaluate import make_folds, validation_split
from training.exceptions import DataError

HEADER = ["slide_id", "patient_id", "pap_group", "field", "diffuse", "polarized"]
PARAMS = parse_params()


def write_manifest(root: Path, rows: list[list[str]], header: list[str] = HEADER) -> None:
    with (root / "manifest.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four simulated slides, two 96x80 fields each, written as PNG pairs."""
    root = tmp_path_factory.mktemp("ds")
    rows = []
    for i in range(4):
        slide = slide_for(i, seed=5)
        for f, (x, y) in enumerate(slide.field_positions(2)):
            w, p = slide.render_pair(x, y, size=(96, 80))
            wp, pp = f"s{i}/f{f}-W.png", f"s{i}/f{f}-P.png"
            write_png(root / wp, w)
            write_png(root / pp, p)
            rows.append([slide.slide_id, f"pat{i}", slide.pap_group, str(f), wp, pp])
    write_manifest(root, rows)
    return root


def test_loads_slides_with_device_spectra(small_dataset: Path) -> None:
    ds = load_dataset(small_dataset, PARAMS, cache_dir=None)
    assert ds.kind == "fields" and ds.stats.fields_total == 8
    assert ds.stats.fields_used + ds.stats.fields_rejected == 8
    assert len(ds.slides) + len(ds.stats.slides_excluded) == 4
    for s in ds.slides:
        assert s.y is not None and s.y.shape == (PARAMS.n_bins,)
        assert s.fields_used >= 1


def test_qc_rejections_are_summarised_by_reason(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Many rejected fields give one summary line with counts by reason, not a line each."""
    rows, faulty = [], 0
    for i in range(3):
        slide = slide_for(i, seed=5)
        for f, (x, y) in enumerate(slide.field_positions(3)):
            w, p = slide.render_pair(x, y, size=(96, 80))
            if (i + f) % 2 == 1:  # dark: an LED at a few percent of its current
                w, p = (w * 0.04).astype(np.uint8), (p * 0.04).astype(np.uint8)
                faulty += 1
            wp, pp = f"s{i}/f{f}-W.png", f"s{i}/f{f}-P.png"
            write_png(tmp_path / wp, w)
            write_png(tmp_path / pp, p)
            rows.append([slide.slide_id, f"pat{i}", slide.pap_group, str(f), wp, pp])
    write_manifest(tmp_path, rows)
    with caplog.at_level(logging.INFO):
        ds = load_dataset(tmp_path, PARAMS, cache_dir=None)
    assert ds.stats.fields_rejected >= faulty == 4
    by_reason = Counter(r for f in ds.stats.rejected for r in f["reasons"])
    assert by_reason["dark"] >= faulty
    assert ds.stats.to_json()["rejected_by_reason"] == dict(sorted(by_reason.items()))
    shown = [r for r in caplog.records if r.levelno >= logging.INFO]
    # one summary, plus one line per slide left out entirely: never one per field
    assert len(shown) <= 1 + len(ds.stats.slides_excluded), [r.getMessage() for r in shown]
    summary = next(r.getMessage() for r in shown if "rejected by QC" in r.getMessage())
    assert f"{ds.stats.fields_rejected} rejected by QC" in summary
    for reason, count in by_reason.items():
        assert f"{reason} {count}" in summary, summary


def test_bad_rows_are_reported_together(small_dataset: Path, tmp_path: Path) -> None:
    rows = list(csv.reader((small_dataset / "manifest.csv").open()))[1:]
    for r in rows:
        r[4] = str(small_dataset / r[4])
        r[5] = str(small_dataset / r[5])
    bad = [
        rows[0],
        [*rows[2][:4], str(tmp_path / "nope.png"), rows[2][5]],  # line 3: missing file
        [rows[4][0], rows[4][1], "VII", *rows[4][3:]],  # line 4: unknown group
        rows[0],  # line 5: duplicate slide/field
        rows[6],
        [rows[7][0], "someone-else", *rows[7][2:]],  # line 7: inconsistent patient
    ]
    write_manifest(tmp_path, bad)
    with pytest.raises(DataError) as err:
        load_dataset(tmp_path, PARAMS, cache_dir=None)
    msg = str(err.value)
    assert "4 problem(s)" in msg
    assert "line 3: diffuse file" in msg and "not found" in msg
    assert "line 4: unknown pap_group 'VII'" in msg
    assert "line 5: duplicate field '0' of slide" in msg and "first on line 2" in msg
    assert "line 7: slide" in msg and "has patient 'someone-else'" in msg


def test_missing_columns(tmp_path: Path) -> None:
    write_manifest(tmp_path, [["a", "b"]], header=["slide_id", "patient_id"])
    with pytest.raises(DataError, match="missing column"):
        load_dataset(tmp_path, PARAMS)


def test_cache_hit_then_invalidated(
    small_dataset: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cache = tmp_path / "cache"
    first = load_dataset(small_dataset, PARAMS, cache_dir=cache)
    assert first.stats.cache_misses == 4 and first.stats.cache_hits == 0
    with caplog.at_level(logging.INFO, logger="training.data"):
        second = load_dataset(small_dataset, PARAMS, cache_dir=cache)
    assert second.stats.cache_hits == 4 and second.stats.cache_misses == 0
    assert "4 from cache" in caplog.text
    for a, b in zip(first.slides, second.slides, strict=True):
        assert a.y is not None and b.y is not None and np.array_equal(a.y, b.y)
    # a changed image file is a different key: that slide is recomputed
    copy = tmp_path / "copy"
    import shutil

    shutil.copytree(small_dataset, copy, ignore=shutil.ignore_patterns(".omis-cache"))
    w_path = copy / "s0" / "f0-W.png"
    img = read_rgb(w_path)
    img[0, 0] = 255 - img[0, 0]
    write_png(w_path, img)
    third = load_dataset(copy, PARAMS, cache_dir=cache)
    assert third.stats.cache_misses == 1 and third.stats.cache_hits == 3
    # a corrupt cache entry is recomputed, not trusted
    cache2 = tmp_path / "cache2"
    load_dataset(copy, PARAMS, cache_dir=cache2)
    entry = sorted(cache2.glob("*.npz"))[0]
    entry.write_bytes(b"garbage")
    fifth = load_dataset(copy, PARAMS, cache_dir=cache2)
    assert fifth.stats.cache_misses == 1 and fifth.stats.cache_hits == 3
    # other spectrum parameters are another key as well
    fourth = load_dataset(copy, parse_params({"n_smooth": 4}), cache_dir=cache)
    assert fourth.stats.cache_misses == 4


def test_precomputed_spectra_and_images(tmp_path: Path) -> None:
    x = np.linspace(-144.5, 144.5, PARAMS.n_bins)
    np.save(tmp_path / "a.npy", np.sin(x / 20))
    np.savetxt(
        tmp_path / "b.csv",
        np.stack([x, np.cos(x / 20)], axis=1),
        delimiter=",",
        header="x,y",
        comments="",
    )
    write_manifest(
        tmp_path,
        [["a", "p1", "II", "a.npy"], ["b", "p2", "V", "b.csv"]],
        header=["slide_id", "patient_id", "pap_group", "spectrum"],
    )
    ds = load_dataset(tmp_path, PARAMS)
    assert ds.kind == "spectra"
    assert ds.slides[1].x_nm is not None and np.allclose(ds.slides[1].x_nm, x)
    assert ds.slides[0].y is not None and np.allclose(ds.slides[0].y, np.sin(x / 20))
    img = np.full((64, 64, 3), 255, np.uint8)
    write_png(tmp_path / "i.png", img)
    write_manifest(
        tmp_path,
        [["a", "p1", "IV", "i.png"]],
        header=["slide_id", "patient_id", "pap_group", "image"],
    )
    ds = load_dataset(tmp_path, PARAMS)
    assert ds.kind == "images" and ds.slides[0].image is not None


def test_folds_never_split_a_patient() -> None:
    rng = np.random.default_rng(0)
    patients = [f"p{i // 3}" for i in range(90)]  # three slides per patient
    groups = [str(rng.choice(["II", "III", "IV", "V"])) for _ in range(30) for _ in range(3)]
    labels = TASKS["binary"].labels(groups)
    folds = make_folds(labels, patients, 5, seed=1)
    seen_test: list[int] = []
    for train, test in folds:
        assert not {patients[i] for i in train} & {patients[i] for i in test}
        fit_idx, val_idx = validation_split(train, labels, patients, seed=2)
        assert not {patients[i] for i in fit_idx} & {patients[i] for i in val_idx}
        assert sorted([*fit_idx, *val_idx]) == sorted(train)
        seen_test += test.tolist()
    assert sorted(seen_test) == list(range(90))
    with pytest.raises(DataError, match="at least 5 patients"):
        make_folds(labels[:9], patients[:9], 5, seed=1)
