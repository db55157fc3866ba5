"""What a run reads and records: image datasets the device reproduces, weights, lossy files,
spectrum axes, the hash of every data file."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
from test_train_data import PARAMS, write_manifest
from test_train_pipeline import omis

from firmware_bridge.images import read_rgb, write_png
from firmware_bridge.sim.sample import slide_for
from inference.bundle import load_bundle
from inference.render import RenderParams, render_params_from_json, render_spectrum
from inference.spectrum import axis_nm
from training.data import load_dataset
from training.exceptions import ConfigError, DataError
from training.options import TrainOptions, check_weights_decision, pretrained_record

X = axis_nm(PARAMS)
IMAGE_RENDER = RenderParams(width=64, height=64, x_range_nm=(-30.0, 20.0), y_range=(-3.0, 25.0))


def _spectrum(i: int) -> np.ndarray:
    u = (X - 3.0 * (i % 3)) / 12.0
    high = i % 2
    return (18.0 + i) * np.where(np.abs(u) < 1.0, (1.0 - u * u) ** 2, 0.0) - high * 2.0 * np.exp(
        -(((X + 25.0) / 6.0) ** 2)
    )


def test_image_dataset_bundle_draws_what_the_images_show(tmp_path: Path) -> None:
    """The device renders each spectrum exactly as its training image (was: ~520 pixels off)."""
    data = tmp_path / "data"
    data.mkdir()
    rows = []
    for i in range(8):
        write_png(data / f"s{i}.png", render_spectrum(X, _spectrum(i), IMAGE_RENDER))
        rows.append([f"s{i}", f"p{i}", ("II", "V")[i % 2], f"s{i}.png"])
    write_manifest(data, rows, header=["slide_id", "patient_id", "pap_group", "image"])
    (tmp_path / "render.json").write_text(json.dumps(IMAGE_RENDER.model_dump(mode="json")))
    refused = omis(
        *("train", "--data", str(data), "--out", str(tmp_path / "no"), "-q"), check=False
    )
    assert refused.returncode == 1 and len(refused.stderr.strip().splitlines()) == 1
    assert "--render-params" in refused.stderr and not (tmp_path / "no").exists()
    out = tmp_path / "out"
    omis(
        *("train", "--data", str(data), "--out", str(out), "--folds", "2", "--epochs", "1"),
        *("--render-params", f"@{tmp_path / 'render.json'}", "-q"),
    )
    m = load_bundle(out / "bundle").manifest
    device = render_params_from_json(m.render)
    assert device == IMAGE_RENDER
    for i in range(8):
        assert np.array_equal(
            render_spectrum(X, _spectrum(i), device), read_rgb(data / f"s{i}.png")
        )


def test_paper_preset_needs_a_weights_decision(tmp_path: Path) -> None:
    proc = omis(
        *("train", "--data", str(tmp_path), "--out", str(tmp_path / "o"), "--preset", "paper"),
        check=False,
    )
    assert proc.returncode == 1 and len(proc.stderr.strip().splitlines()) == 1
    assert "--pretrained" in proc.stderr and "--from-scratch" in proc.stderr
    opts = TrainOptions(data=tmp_path, out=tmp_path / "o", preset="paper", from_scratch=True)
    check_weights_decision(opts)
    assert pretrained_record(opts) is None
    weights = tmp_path / "vgg16.pth"
    weights.write_bytes(b"weights")
    rec = pretrained_record(opts.model_copy(update={"from_scratch": False, "pretrained": weights}))
    assert rec is not None and rec.source == "vgg16.pth"
    assert rec.sha256 == hashlib.sha256(b"weights").hexdigest()
    with pytest.raises(ConfigError, match="exclude each other"):
        check_weights_decision(opts.model_copy(update={"pretrained": weights}))


def _field_dataset(root: Path, n: int = 2) -> None:
    rows = []
    for i in range(n):
        slide = slide_for(i, seed=3)
        (x, y), *_ = slide.field_positions(1)
        w, p = slide.render_pair(x, y, size=(64, 48))
        write_png(root / f"w{i}.png", w)
        write_png(root / f"p{i}.png", p)
        rows.append([slide.slide_id, f"pat{i}", slide.pap_group, "0", f"w{i}.png", f"p{i}.png"])
    write_manifest(root, rows)


def test_lossy_fields_are_refused_unless_allowed(tmp_path: Path) -> None:
    _field_dataset(tmp_path)
    ok, jpeg = cv2.imencode(
        ".jpg", cv2.imread(str(tmp_path / "w1.png")), [cv2.IMWRITE_JPEG_QUALITY, 95]
    )
    assert ok
    (tmp_path / "w1.png").write_bytes(jpeg.tobytes())  # a JPEG under a .png name
    with pytest.raises(DataError, match=r"line 3: diffuse file 'w1.png' is lossy JPEG"):
        load_dataset(tmp_path, PARAMS)
    assert len(load_dataset(tmp_path, PARAMS, allow_lossy=True).slides) == 2


def test_data_hash_covers_every_file(tmp_path: Path) -> None:
    _field_dataset(tmp_path)
    before = load_dataset(tmp_path, PARAMS)
    img = read_rgb(tmp_path / "p0.png")
    img[0, 0, 0] ^= 1
    write_png(tmp_path / "p0.png", img)
    after = load_dataset(tmp_path, PARAMS)
    assert after.manifest_sha256 == before.manifest_sha256
    assert after.files_sha256 != before.files_sha256 and len(after.files_sha256) == 64


def test_spectra_must_be_on_the_algorithms_axis(tmp_path: Path) -> None:
    y = np.exp(-((X / 20.0) ** 2))
    np.savetxt(tmp_path / "a.csv", np.stack([X, y], axis=1), delimiter=",")
    np.savetxt(tmp_path / "b.csv", np.stack([X * 0.5, y], axis=1), delimiter=",")
    write_manifest(
        tmp_path,
        [["a", "p1", "II", "a.csv"], ["b", "p2", "V", "b.csv"]],
        header=["slide_id", "patient_id", "pap_group", "spectrum"],
    )
    with pytest.raises(DataError, match=r"line 3: b.csv: its x axis .* is not the axis of"):
        load_dataset(tmp_path, PARAMS)
    shutil.copy(tmp_path / "a.csv", tmp_path / "b.csv")
    assert len(load_dataset(tmp_path, PARAMS).slides) == 2


def test_task_ii_v_keeps_pap_ii_and_v_only(tmp_path: Path) -> None:
    from training.progress import Progress

    rows = []
    for i, group in enumerate(["II", "III", "IV", "V", "II", "V"]):
        np.save(tmp_path / f"s{i}.npy", _spectrum(i))
        rows.append([f"s{i}", f"p{i}", group, f"s{i}.npy"])
    write_manifest(tmp_path, rows, header=["slide_id", "patient_id", "pap_group", "spectrum"])
    from training.pipeline import prepare

    opts = TrainOptions(data=tmp_path, out=tmp_path / "o", task="ii-v", no_cache=True)
    p = prepare(opts, Progress(enabled=False))
    assert p.task.classes == ("II", "V") and p.outside_task == 2
    assert [s.pap_group for s in p.ds.slides] == ["II", "V", "II", "V"]
    assert p.labels.tolist() == [0, 1, 0, 1]
