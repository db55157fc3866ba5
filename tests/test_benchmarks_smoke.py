"""Every benchmark script runs end to end with tiny sizes (CI does not run the real benchmarks).

The numbers are not checked (speed belongs to the benchmarks, not to tests); what is checked is
that each script still starts, talks to its real parts (pty firmware, mosquitto, ONNX Runtime,
torch) and prints its table, and that the spectrum benchmark's bit-identity column holds.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def launch(script: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )


def run_bench(script: str, *args: str) -> str:
    proc = launch(script, *args)
    assert proc.returncode == 0, f"{script} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return proc.stdout


def test_bench_spectrum_cpu(tmp_path: Path) -> None:
    out = tmp_path / "spectrum.json"
    text = run_bench(
        "bench_spectrum.py",
        "--no-gpu",
        "--cpu-size",
        "67x45",
        "--ref-repeats",
        "1",
        "--fast-repeats",
        "1",
        "--json",
        str(out),
    )
    assert "omis-wdiff-v1" in text and "omis-rbhist-v1" in text
    rows = json.loads(out.read_text())["cpu"]
    assert {r["algorithm"] for r in rows} == {"omis-wdiff-v1", "omis-rbhist-v1"}
    assert all(r["bit_identical"] is True and r["size"] == "67x45" for r in rows)


@pytest.mark.parametrize(
    ("source", "says"),
    [
        ((), "simulator rendering in this process"),
        (("--render-process",), "simulator rendering in a child process"),
        (("--camera-ms", "2"), "camera-like, 2 ms per field"),
    ],
    ids=["in-process", "child-process", "camera-like"],
)
def test_bench_pipeline(source: tuple[str, ...], says: str) -> None:
    sizes = ("--size", "64x48", "--slides", "2", "--fields", "4", "--repeats", "1")
    text = run_bench("bench_pipeline.py", *sizes, *source)
    assert says in text
    assert "pipelined / slowest stage alone" in text and "glue" in text


def test_bench_pipeline_refuses_two_sources() -> None:
    proc = launch("bench_pipeline.py", "--render-process", "--camera-ms", "5")
    assert proc.returncode == 2 and "pick one" in proc.stderr


def test_bench_qc() -> None:
    args = ("--sizes", "96x64,128x96", "--slides", "2", "--fields", "2", "--repeats", "1")
    text = run_bench("bench_qc.py", *args)
    assert "QC/spec" in text and "96x64" in text and "128x96" in text


def test_bench_acquisition() -> None:
    text = run_bench("bench_acquisition.py", "--fields", "2")
    assert "640x512, 5 mm/s" in text


def test_bench_outbox() -> None:
    text = run_bench("bench_outbox.py", "--n", "20")
    rows = json.loads(text.strip().splitlines()[-1])
    assert {(r["sync"], r["inflight"]) for r in rows} >= {("full", 1), ("normal", 100)}
    assert all(r["commit"] > 0 and r["drain"] > 0 for r in rows)


@pytest.mark.torch
def test_bench_train() -> None:
    pytest.importorskip("torch")
    text = run_bench("bench_train.py", "--batches", "1", "--presets", "tiny")
    assert "tiny" in text and "img/s" in text


def test_bench_spectrum_gpu_requested_says_why_it_cannot_run() -> None:
    """``--gpu`` never quietly measures only the CPU: without CUDA it fails and says why."""
    sizes = ("--cpu-size", "16x8", "--gpu-size", "64x48")
    repeats = ("--ref-repeats", "1", "--fast-repeats", "1", "--gpu-repeats", "2")
    proc = launch("bench_spectrum.py", "--gpu", *sizes, *repeats)
    if proc.returncode == 0:  # a machine with a usable GPU and pycuda
        assert "GPU kernel" in proc.stdout
    else:
        assert proc.returncode == 1
        assert "GPU part requested but CUDA is unusable" in proc.stderr


def test_bench_collector_sqlite() -> None:
    text = run_bench("bench_collector.py", "--n", "5")
    assert "| sqlite |" in text and "via MQTT" in text


def test_bench_outbox_locking() -> None:
    text = run_bench("bench_outbox_locking.py", "--n", "10", "--rounds", "1")
    data = json.loads(text.strip().splitlines()[-1])
    assert data["median_commits_per_s"]["shipped"] > 0
    assert data["median_ratio_shipped_over_previous"] > 0


def test_bench_shadow() -> None:
    args = ("--size", "64x48", "--slides", "2", "--fields", "2", "--repeats", "1")
    text = run_bench("bench_shadow.py", *args)
    assert "latency to the serving result" in text and "shadow share of the slide cycle" in text


# bench_operating_point.py runs end to end in
# tests/test_train_pipeline.py::test_the_shipped_bundle_keeps_the_referral_bound_on_new_slides
