"""End to end: `omis dataset synth` -> `omis train` -> verified bundle -> export -> evaluate."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from inference.bundle import load_bundle
from inference.preprocess import to_tensor
from inference.render import render_params_from_json, render_spectrum
from inference.spectrum import parse_params
from inference.spectrum.qc import QCThresholds
from training.data import load_dataset

OMIS = [sys.executable, "-m", "deploy.cli"]
ROOT = Path(__file__).resolve().parents[1]


def omis(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [*OMIS, *args], capture_output=True, text=True, env=env, cwd=ROOT, check=False, timeout=300
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"omis {args[0]} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    base = tmp_path_factory.mktemp("train")
    data, out = base / "data", base / "out"
    omis(
        "dataset",
        "synth",
        "--out",
        str(data),
        "--slides",
        "16",
        "--fields",
        "2",
        "--size",
        "96x80",
        "--seed",
        "7",
        "-q",
    )
    proc = omis(
        "train",
        "--data",
        str(data),
        "--out",
        str(out),
        "--preset",
        "tiny",
        "--folds",
        "2",
        "--epochs",
        "2",
        "--seed",
        "1",
        "--name",
        "test-model",
        "--version",
        "3",
        "--json",
    )
    return {"data": data, "out": out, "summary": json.loads(proc.stdout), "stderr": proc.stderr}


def test_outputs_and_report(trained: dict[str, Any]) -> None:
    out: Path = trained["out"]
    for name in (
        "report.json",
        "report.md",
        "config.json",
        "plots/confusion.png",
        "plots/roc.png",
        "plots/mean_spectra.png",
        "checkpoints/final.pt",
    ):
        assert (out / name).is_file(), name
    assert not list(out.parent.glob(".out.*")), "no temporary directory left behind"
    report = json.loads((out / "report.json").read_text())
    n = report["data"]["slides_used"]
    assert len(report["cnn"]["per_fold"]) == 2
    for block in (report, report["cnn"]["pooled"], *report["cnn"]["per_fold"]):
        for key in ("sensitivity", "specificity", "accuracy"):
            p = block[key]
            if p["value"] is not None:
                lo, hi = p["ci95"]
                assert 0.0 <= lo <= p["value"] <= hi <= 1.0
        assert "confusion_matrix" in block and "calibration" in block
    assert sum(map(sum, report["confusion_matrix"])) == n
    assert sum(f["n"] for f in report["cnn"]["per_fold"]) == n
    for name in ("naive_bayes", "random_forest"):
        assert report["baselines"][name]["pooled"]["n"] == n
    assert report["export"]["onnx_vs_torch_max_abs_diff"] <= 1e-4
    md = (out / "report.md").read_text()
    assert "not clinical performance" in md and "37.14" in md and "83.3" in md
    assert trained["summary"]["cnn"]["accuracy"] == report["accuracy"]


def test_bundle_verifies_and_reproduces_golden(trained: dict[str, Any]) -> None:
    bundle = load_bundle(trained["out"] / "bundle")
    m = bundle.manifest
    assert (m.name, m.version, m.task, m.classes) == ("test-model", 3, "binary", ("low", "high"))
    assert m.input.shape == (-1, 3, 64, 64)
    assert m.training.metrics["folds"] == 2 and m.training.preset == "tiny"
    assert len(m.training.data_manifest_sha256) == 64
    # The QC thresholds the training data passed travel with the model, for the device.
    assert m.qc == QCThresholds().model_dump() and m.qc_thresholds == QCThresholds()
    inputs, outputs = bundle.golden()
    sess = ort.InferenceSession(str(bundle.model_path), providers=["CPUExecutionProvider"])
    got = sess.run(["probabilities"], {"input": inputs})[0]
    assert np.max(np.abs(got - outputs)) <= 1e-5
    assert np.allclose(got.sum(axis=1), 1.0, atol=1e-5)
    one = sess.run(["probabilities"], {"input": inputs[:1]})[0]  # dynamic batch axis
    assert np.max(np.abs(one - outputs[:1])) <= 1e-5
    props = {p.key: p.value for p in onnx.load(str(bundle.model_path)).metadata_props}
    assert props["name"] == "test-model" and json.loads(props["classes"]) == ["low", "high"]
    assert props["spectrum_algorithm"] == m.spectrum["algorithm"]
    assert props["render_version"] == m.render["version"]
    assert onnx.load(str(bundle.model_path)).opset_import[0].version >= 17


def test_golden_inputs_are_the_device_preprocessing(trained: dict[str, Any]) -> None:
    """Each golden input is a slide's spectrum rendered and preprocessed from the manifest."""
    bundle = load_bundle(trained["out"] / "bundle")
    m = bundle.manifest
    ds = load_dataset(trained["data"], parse_params(m.spectrum), cache_dir=None)
    render = render_params_from_json(m.render)
    device_inputs = to_tensor([render_spectrum(s.x_nm, s.y, render) for s in ds.slides], m.input)
    inputs, _ = bundle.golden()
    for row in inputs:
        assert any(np.array_equal(row, d) for d in device_inputs)


def test_export_checkpoint_rebuilds_the_model(trained: dict[str, Any], tmp_path: Path) -> None:
    target = tmp_path / "b2"
    omis(
        "export",
        "--checkpoint",
        str(trained["out"] / "checkpoints" / "final.pt"),
        "--out",
        str(target),
        "--version",
        "4",
    )
    b1, b2 = load_bundle(trained["out"] / "bundle"), load_bundle(target)
    assert b2.manifest.version == 4
    assert b2.manifest.qc == b1.manifest.qc
    assert np.array_equal(b1.golden()[0], b2.golden()[0])
    assert np.max(np.abs(b1.golden()[1] - b2.golden()[1])) <= 1e-6
    again = omis(
        "export",
        "--checkpoint",
        str(trained["out"] / "checkpoints" / "final.pt"),
        "--out",
        str(target),
        check=False,
    )
    assert again.returncode == 1 and "already exists" in again.stderr


def test_evaluate_bundle_cli(trained: dict[str, Any]) -> None:
    proc = omis(
        "evaluate",
        "--bundle",
        str(trained["out"] / "bundle"),
        "--data",
        str(trained["data"]),
        "--json",
    )
    res = json.loads(proc.stdout)
    report = json.loads((trained["out"] / "report.json").read_text())
    assert res["metrics"]["n"] == report["data"]["slides_used"]
    assert res["data_manifest_sha256"] == report["data"]["manifest_sha256"]
    assert res["preparation"]["cache_misses"] == 0  # the training run's cache is reused
    assert res["backend"]["name"] == "onnxruntime"
    assert len(res["predictions"]) == res["metrics"]["n"]


def test_evaluate_agrees_with_the_device_pipeline(trained: dict[str, Any]) -> None:
    """`omis evaluate` classifies a slide exactly as the device's pipeline (`omis infer`) does."""
    import csv

    from firmware_bridge.images import read_rgb
    from inference.backends import load_backend
    from inference.pipeline import PipelineConfig, SlidePipeline
    from training.evaluate import evaluate_bundle

    bundle = load_bundle(trained["out"] / "bundle")
    res = evaluate_bundle(bundle.root, trained["data"], cache_dir=None, max_slides=2)
    with (trained["data"] / "manifest.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    with load_backend("onnxruntime", bundle) as backend:
        pipe = SlidePipeline(bundle, backend, PipelineConfig(spectrum_backend="numpy"))
        for pred in res["predictions"]:
            fields = [
                (
                    read_rgb(trained["data"] / r["diffuse"]),
                    read_rgb(trained["data"] / r["polarized"]),
                )
                for r in rows
                if r["slide_id"] == pred["slide_id"]
            ]
            got = pipe.run_slide(fields)
            want = dict(zip(bundle.manifest.classes, pred["probabilities"], strict=True))
            assert got.probabilities == pytest.approx(want, abs=1e-6)


def test_cli_errors_are_one_line(trained: dict[str, Any], tmp_path: Path) -> None:
    proc = omis(
        "train",
        "--data",
        str(trained["data"]),
        "--out",
        str(tmp_path / "x"),
        "--device",
        "cuda",
        "-q",
        check=False,
    )
    if "CUDA is not available" not in proc.stderr:
        pytest.skip("a CUDA device is present: the no-fallback error cannot be provoked")
    assert proc.returncode == 1 and len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()
    proc = omis("train", "--data", str(trained["data"]), "--out", str(trained["out"]), check=False)
    assert proc.returncode == 1 and "not an empty directory" in proc.stderr


def _train_args(data: Path, out: Path) -> list[str]:
    return [
        "train",
        "--data",
        str(data),
        "--out",
        str(out),
        "--preset",
        "tiny",
        "--folds",
        "2",
        "--epochs",
        "2",
        "--seed",
        "1",
        "--name",
        "test-model",
        "--version",
        "3",
        "--json",
    ]


def test_report_gives_the_referral_rate_and_both_sensitivities(trained: dict[str, Any]) -> None:
    out: Path = trained["out"]
    report = json.loads((out / "report.json").read_text())
    n = report["data"]["slides_used"]
    rows = list(csv.DictReader((out / "predictions.csv").open()))
    referred = sum(r["abstained"] == "true" for r in rows)
    rr = report["referral_rate"]
    assert set(rr) >= {"value", "ci95", "n", "successes"}
    assert (rr["successes"], rr["n"]) == (referred, n)
    assert rr["ci95"][0] <= rr["value"] <= rr["ci95"][1]
    for key in ("sensitivity_decided", "specificity_with_review"):
        assert report[key]["n"] >= 0 and key in report["cnn"]["pooled"]
    for name in ("naive_bayes", "logistic_regression"):
        assert "referral_rate" in report["baselines"][name]["pooled"]
    assert report["thresholds"]["max_referral"] == 0.2
    verdict = report["comparison"]["against_best_baseline"]
    assert verdict and report["comparison"]["best_baseline"] in verdict
    assert "referred" in (out / "report.md").read_text()


def test_predictions_csv_reproduces_the_report(trained: dict[str, Any]) -> None:
    """Full precision and every model's thresholds: the file gives the report's AUCs exactly."""
    from training.metrics import roc_auc

    out: Path = trained["out"]
    report = json.loads((out / "report.json").read_text())
    rows = list(csv.DictReader((out / "predictions.csv").open()))
    positive = np.array([r["truth"] == "high" for r in rows])
    models = {"vgg16": report["cnn"], **report["baselines"]}
    for name, res in models.items():
        p = np.array([float(r[f"p_high_{name}"]) for r in rows])
        assert roc_auc(positive, p) == res["pooled"]["roc_auc"], name
        thr = np.array([float(r[f"threshold_{name}"]) for r in rows])
        lo = np.array([float(r[f"abstain_low_{name}"]) for r in rows])
        hi = np.array([float(r[f"abstain_high_{name}"]) for r in rows])
        assert np.all((lo <= thr) & (thr <= hi)), name
        referred = int(((p >= lo) & (p <= hi)).sum())
        assert referred == res["pooled"]["referral_rate"]["successes"], name


def test_the_same_command_gives_the_same_report_and_repeats_spread(
    trained: dict[str, Any], tmp_path: Path
) -> None:
    """Threads, seeds and deterministic kernels are fixed and recorded: the fixture's command
    run again with ``--repeats 2`` (and another thread count in the environment) gives, for
    its first seed, the same report and predictions byte for byte; repeats.json spreads every
    figure and paired comparison over the two seeds."""
    config = json.loads((trained["out"] / "config.json").read_text())
    assert config["torch_threads"] == 1
    env = config["environment"]
    assert env["deterministic_algorithms"] is True
    assert env["libraries"]["torch"] and env["machine"]["cpu_count"]
    again = tmp_path / "again"
    proc = subprocess.run(
        [*OMIS, *_train_args(trained["data"], again), "--repeats", "2"],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "2"},
        cwd=ROOT,
        check=False,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    first = (trained["out"] / "report.json").read_bytes()
    assert (again / "seed-1" / "report.json").read_bytes() == first
    assert (again / "seed-1" / "predictions.csv").read_bytes() == (
        trained["out"] / "predictions.csv"
    ).read_bytes()
    agg = json.loads((again / "repeats.json").read_text())
    assert agg["seeds"] == [1, 2]
    figures = agg["figures"]
    for key in ("vgg16.roc_auc", "vgg16.referral_rate", "logistic_regression.roc_auc"):
        s = figures[key]
        values = [agg["per_seed"][seed][key] for seed in ("1", "2")]
        assert s["n"] == 2 and s["min"] == min(values) and s["max"] == max(values)
        assert s["mean"] == pytest.approx(sum(values) / 2)
    assert "network_minus_naive_bayes.auc_difference" in figures
    assert "| vgg16.roc_auc |" in (again / "repeats.md").read_text()


def test_exported_fold_checkpoint_reproduces_its_predictions(
    trained: dict[str, Any], tmp_path: Path
) -> None:
    """``omis export`` of fold-K.pt carries that fold's window, temperature and thresholds: the
    device path on the fold's test slides gives predictions.csv's p(high) and thresholds."""
    from training.evaluate import evaluate_bundle

    out: Path = trained["out"]
    rows = list(csv.DictReader((out / "predictions.csv").open()))
    for k in (1, 2):
        target = tmp_path / f"fold-{k}"
        omis(
            "export",
            "--checkpoint",
            str(out / "checkpoints" / f"fold-{k}.pt"),
            "--out",
            str(target),
        )
        m = load_bundle(target).manifest
        res = evaluate_bundle(target, trained["data"])
        got = {
            p["slide_id"]: sum(p["probabilities"][c] for c in m.high_classes)
            for p in res["predictions"]
        }
        mine = [r for r in rows if r["fold"] == str(k)]
        assert mine
        for r in mine:
            assert abs(got[r["slide_id"]] - float(r["p_high_vgg16"])) <= 1e-5, r["slide_id"]
            assert m.thresholds.decision == float(r["threshold_vgg16"])
            assert m.thresholds.abstain_low == float(r["abstain_low_vgg16"])
            assert m.thresholds.abstain_high == float(r["abstain_high_vgg16"])


def test_the_shipped_operating_point_comes_from_slides_it_never_trained_on(
    trained: dict[str, Any],
) -> None:
    report = json.loads((trained["out"] / "report.json").read_text())
    final = report["final_model"]
    n = report["data"]["slides_used"]
    assert final["fit_slides"] + final["validation_slides"] + final["calibration_slides"] == n
    assert 0 < final["calibration_slides"] < n
    op = report["shipped_operating_point"]
    assert op["slides"] == final["calibration_slides"] and "calibration split" in op["measured_on"]
    m = load_bundle(trained["out"] / "bundle").manifest
    assert m.thresholds.decision == op["thresholds"]["decision"]
    rec = m.training.operating_point
    assert rec is not None and rec.slides == final["calibration_slides"]
    assert rec.referral_rate == op["validated_referral_rate"]["value"]
    assert rec.referral_rate <= report["thresholds"]["max_referral"]
    # monitoring in service compares with the same validated rate as the health period
    ref = m.training.metrics["reference_distribution"]
    assert ref["rates"]["referral_rate"] == rec.referral_rate
    # trained like a fold model: early stopping on its own inner validation patients
    assert final["epochs"] == final["attempts"][-1]["best_epoch"] <= final["epochs_run"]
    # a fit stuck at chance-level loss is retried with another seed, each attempt recorded and
    # named in the warnings (two epochs on 16 slides: usually all three attempts)
    attempts, failed = final["attempts"], final["collapsed_attempts"]
    assert failed in (len(attempts), len(attempts) - 1)
    assert len({a["seed"] for a in attempts}) == len(attempts)
    if failed == len(attempts):
        assert len(attempts) == 3
        assert report["warnings"][0].startswith("SHIPPED MODEL: every one of 3 final fits")
    elif failed:
        assert any(w.startswith("final model: seed") for w in report["warnings"])
    assert 0.0 <= rec.no_usable_field_rate <= 1.0 and rec.field_acceptance is not None


@pytest.mark.slow
def test_the_shipped_bundle_keeps_the_referral_bound_on_new_slides(tmp_path: Path) -> None:
    """Train, then score slides no part of training saw (another simulator seed) exactly as
    the device would (``omis validate``), through benchmarks/bench_operating_point.py: the
    bundle refers at most ``--max-referral`` of them, and the rate it records for the OTA
    health period is that bound's certificate."""
    out = tmp_path / "op.json"
    proc = subprocess.run(
        [
            sys.executable, str(ROOT / "benchmarks" / "bench_operating_point.py"),
            "--slides", "72", "--new", "150", "--fields", "2", "--size", "96x80",
            "--epochs", "10", "--folds", "2", "--repeats", "1", "--max-referral", "0.3",
            "--data-seed", "5", "--new-seed", "6", "--work", str(tmp_path), "--json", str(out),
        ],
        capture_output=True, text=True, cwd=ROOT, check=False, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "referral bound held on the new slides in" in proc.stdout
    (row,) = json.loads(out.read_text())["rows"]
    (bundle,) = tmp_path.glob("runs-tiny-*/bundle")
    rec = load_bundle(bundle).manifest.training.operating_point
    assert rec is not None and rec.referral_rate == row["validated_referral_bound"] <= 0.3
    assert rec.slides == row["calibration_slides"]
    assert row["slides_in_band"] >= 1  # a real band (15 calibration slides allow one at 0.3)
    referred = row["referral_rate"]
    assert referred["n"] == row["new_slides"] == 150
    assert referred["value"] <= 0.3, (referred, row)


def test_best_fold_ships_a_fold_model_with_its_own_thresholds(
    trained: dict[str, Any], tmp_path: Path
) -> None:
    """``--final best-fold``: the bundle carries that fold's thresholds and records as its
    validated referral rate the band's bound from that fold's validation slides (or the fold's
    test rate when higher)."""
    out = tmp_path / "best"
    omis(*_train_args(trained["data"], out), "--final", "best-fold")
    report = json.loads((out / "report.json").read_text())
    final = report["final_model"]
    assert final["choice"] == "best-fold"
    k = final["fold"]
    fold_th = report["thresholds"]["per_fold"][k - 1]
    m = load_bundle(out / "bundle").manifest
    assert (m.thresholds.decision, m.thresholds.abstain_low, m.thresholds.abstain_high) == (
        fold_th["decision"],
        fold_th["abstain_low"],
        fold_th["abstain_high"],
    )
    rec = m.training.operating_point
    observed = report["cnn"]["per_fold"][k - 1]["referral_rate"]["value"]
    assert rec is not None and f"fold {k}" in rec.measured_on
    assert rec.referral_rate == max(observed, fold_th["referral_bound"]["upper_bound"])
