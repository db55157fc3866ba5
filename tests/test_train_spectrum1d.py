"""`--preset spectrum1d`: trains, exports (TensorRT-supported ops only), serves via `omis infer`."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from test_train_pipeline import omis

from inference.bundle import load_bundle

# Ops TensorRT's ONNX parser supports natively (no plugin); the 1-D model must stay inside them.
TENSORRT_OPS = {"Conv", "BatchNormalization", "Relu", "MaxPool", "Flatten", "Gemm", "Softmax"}
TENSORRT_OPS |= {"Reshape", "Div", "Constant"}


@pytest.fixture(scope="module")
def trained1d(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    base = tmp_path_factory.mktemp("train1d")
    data, out = base / "data", base / "out"
    omis(
        *("dataset", "synth", "--out", str(data), "--slides", "16", "--fields", "2"),
        *("--size", "96x80", "--seed", "5", "-q"),
    )
    omis(
        *("train", "--data", str(data), "--out", str(out), "--preset", "spectrum1d"),
        *("--folds", "2", "--epochs", "3", "--seed", "2", "--name", "s1d", "--json"),
        "--temperature-scaling",
    )
    return {"data": data, "out": out, "base": base}


def test_manifest_says_the_model_reads_the_spectrum(trained1d: dict[str, Any]) -> None:
    bundle = load_bundle(trained1d["out"] / "bundle")
    m = bundle.manifest
    assert m.input.representation == "spectrum" and m.input.shape == (-1, 1, 1, 290)
    assert m.training.preset == "spectrum1d" and m.training.pretrained is None
    assert m.thresholds.chosen_on == "validation" and m.thresholds.out_of_range == 0.05
    assert m.render["x_range_nm"] is not None  # the window: out_of_range on the device
    ops = {n.op_type for n in onnx.load(str(bundle.model_path)).graph.node}
    assert ops <= TENSORRT_OPS, ops - TENSORRT_OPS


def test_report_and_predictions(trained1d: dict[str, Any]) -> None:
    out: Path = trained1d["out"]
    report = json.loads((out / "report.json").read_text())
    assert report["model"] == "spectrum1d" and report["input"] == "spectrum"
    assert report["thresholds"]["chosen_on"] == "validation"
    assert set(report["render_coverage"]) == {"low", "high"}
    assert all(v >= 0.99 for v in report["render_coverage"].values())
    assert set(report["comparison"]["auc"]) == {
        "spectrum1d",
        "naive_bayes",
        "random_forest",
        "logistic_regression",
        "best_bin",
    }
    for t in report["comparison"]["paired_with_network"].values():
        assert "p_value" in t["delong"] and "p_value" in t["mcnemar"]
    assert len(report["training_history"]) == 2
    assert all("val_loss" in h for hist in report["training_history"] for h in hist)
    for name in ("reliability.png", "loss.png", "roc.png"):
        assert (out / "plots" / name).is_file()
    with (out / "predictions.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == report["data"]["slides_used"]
    assert {"slide_id", "patient_id", "fold", "truth", "p_high_spectrum1d", "decision"} <= set(
        rows[0]
    )
    assert {r["fold"] for r in rows} == {"1", "2"}


def test_omis_infer_serves_it_as_evaluate_scores_it(trained1d: dict[str, Any]) -> None:
    data: Path = trained1d["data"]
    bundle = trained1d["out"] / "bundle"
    ev = json.loads(omis("evaluate", "--bundle", str(bundle), "--data", str(data), "--json").stdout)
    with (data / "manifest.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    pred = ev["predictions"][0]
    fields = [r for r in rows if r["slide_id"] == pred["slide_id"]]
    args = [str(data / fields[0]["diffuse"]), str(data / fields[0]["polarized"])]
    for r in fields[1:]:
        args += ["--field", str(data / r["diffuse"]), str(data / r["polarized"])]
    state = trained1d["base"] / "state"
    proc = omis("infer", "-q", "--bundle", str(bundle), *args, "--json", "--state-dir", str(state))
    got = json.loads(proc.stdout)
    want = dict(zip(ev["classes"], pred["probabilities"], strict=True))
    assert got["probabilities"] == pytest.approx(want, abs=1e-6)
    assert got["backend"]["name"] == "onnxruntime"


def test_export_checkpoint_rebuilds_spectrum1d(trained1d: dict[str, Any], tmp_path: Path) -> None:
    out = trained1d["out"]
    omis(
        "export",
        "--checkpoint",
        str(out / "checkpoints" / "final.pt"),
        "--out",
        str(tmp_path / "b"),
    )
    a = np.load(out / "bundle" / "golden" / "outputs.npy")
    b = np.load(tmp_path / "b" / "golden" / "outputs.npy")
    assert np.array_equal(a, b)
