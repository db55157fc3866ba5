"""``omis spectrum`` end to end, through a real subprocess, on small PNGs written here."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from firmware_bridge.images import read_rgb, write_png
from inference.spectrum import compute_spectrum, parse_params

OMIS = Path(sys.executable).with_name("omis")
BASE = [str(OMIS)] if OMIS.exists() else [sys.executable, "-m", "deploy.cli"]


def run(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*BASE, "spectrum", *map(str, args)],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )


def cells(seed: int, h: int = 96, w: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """A small aligned W/P pair of stained 'cells' on glass (P darker, re-tinted)."""
    rng = np.random.default_rng(seed)
    w_img = np.empty((h, w, 3), np.float64)
    p_img = np.empty_like(w_img)
    w_img[:] = (200, 185, 205)
    p_img[:] = (90, 80, 110)
    for _ in range(14):
        centre = (int(rng.integers(0, w)), int(rng.integers(0, h)))
        axes = (int(rng.integers(5, 14)), int(rng.integers(5, 14)))
        colour = rng.uniform(60, 170, 3)
        cv2.ellipse(w_img, centre, axes, 30.0, 0, 360, colour.tolist(), -1)
        cv2.ellipse(p_img, centre, axes, 30.0, 0, 360, (colour * 0.6).tolist(), -1)
        cv2.circle(w_img, centre, 3, (40, 30, 90), -1)
        cv2.circle(p_img, centre, 3, (30, 25, 70), -1)
    w_img += rng.normal(0, 3, w_img.shape)
    p_img += rng.normal(0, 3, p_img.shape)
    return (
        np.clip(w_img, 0, 255).astype(np.uint8),
        np.clip(p_img, 0, 255).astype(np.uint8),
    )


@pytest.fixture
def field(tmp_path: Path) -> tuple[Path, Path]:
    w, p = cells(0)
    return write_png(tmp_path / "w.png", w), write_png(tmp_path / "p.png", p)


@pytest.fixture
def dark_field(tmp_path: Path) -> tuple[Path, Path]:
    w, p = cells(1)
    return (
        write_png(tmp_path / "dark-w.png", (w // 20).astype(np.uint8)),
        write_png(tmp_path / "dark-p.png", (p // 20).astype(np.uint8)),
    )


def error_line(proc: subprocess.CompletedProcess[str]) -> str:
    """The single error line; logs may precede it, but there is exactly one error."""
    assert proc.returncode == 1, proc.stderr
    assert proc.stdout == ""
    errors = [line for line in proc.stderr.splitlines() if line.startswith("omis spectrum: error:")]
    assert len(errors) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    return errors[0]


def test_json_has_the_contract_fields(field: tuple[Path, Path]) -> None:
    proc = run(*field, "--json", "--backend", "numpy")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    for key in ("algorithm", "params", "x_nm", "y", "hist", "count", "valid_pixels", "flags"):
        assert key in data
    assert data["backend"] == "numpy"
    assert data["algorithm"] == "omis-wdiff-v1"
    assert len(data["x_nm"]) == len(data["y"]) == len(data["hist"]) == 290
    expected = compute_spectrum(
        [(read_rgb(field[0]), read_rgb(field[1]))], parse_params(), backend="numpy"
    )
    assert data["hist"] == expected.hist.tolist()
    assert data["valid_pixels"] == expected.valid_pixels
    assert [f["verdict"] for f in data["fields"]] == ["ok"]
    assert data["fields_used"] == [0]


def test_failed_field_is_reported_and_left_out(
    field: tuple[Path, Path], dark_field: tuple[Path, Path]
) -> None:
    proc = run(*field, "--field", *dark_field, "--json", "--backend", "numpy")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert [f["verdict"] for f in data["fields"]] == ["ok", "reject"]
    assert "dark" in data["fields"][1]["reasons"]
    assert data["fields_used"] == [0]
    assert "fields_excluded" in data["flags"]
    assert data["total_pixels"] == 96 * 128  # only the used field's pixels


def test_algorithm_and_params_options(field: tuple[Path, Path], tmp_path: Path) -> None:
    proc = run(*field, "--json", "--algorithm", "omis-rbhist-v1")
    assert proc.returncode == 0, proc.stderr
    assert len(json.loads(proc.stdout)["y"]) == 511
    params_file = tmp_path / "params.json"
    params_file.write_text('{"bins": 100, "n_smooth": 2}')
    for params in ('{"bins": 100, "n_smooth": 2}', f"@{params_file}"):
        data = json.loads(run(*field, "--json", "--params", params).stdout)
        assert len(data["x_nm"]) == 100
        assert data["params"]["n_smooth"] == 2


def test_plot_and_human_summary(field: tuple[Path, Path], tmp_path: Path) -> None:
    out = tmp_path / "plots" / "spectrum.png"
    proc = run(*field, "--plot", out)
    assert proc.returncode == 0, proc.stderr
    assert "omis-wdiff-v1" in proc.stdout
    assert "field 0: ok" in proc.stdout
    image = cv2.imread(str(out), cv2.IMREAD_UNCHANGED)  # matplotlib writes RGBA
    assert image is not None
    assert image.shape[0] > 200 and image.shape[1] > 300
    assert [p.name for p in out.parent.iterdir()] == ["spectrum.png"]  # no temp files left


def test_min_valid_fraction_rejects_fields(field: tuple[Path, Path], tmp_path: Path) -> None:
    w = read_rgb(field[0]).copy()
    w[:48] = 255  # half the field saturated
    half = write_png(tmp_path / "half-w.png", w)
    plot = tmp_path / "never.png"
    line = error_line(
        run(
            half,
            field[1],
            "--qc",
            '{"max_saturated_fraction": 1.0}',
            "--min-valid-fraction",
            "0.9",
            "--plot",
            plot,
        )
    )
    assert "low_valid_fraction" in line
    assert not plot.exists()
    ok = run(
        half,
        field[1],
        "--qc",
        '{"max_saturated_fraction": 1.0}',
        "--min-valid-fraction",
        "0.4",
        "--json",
    )
    assert ok.returncode == 0, ok.stderr


def _bad_inputs(tmp: Path, field: tuple[Path, Path]) -> dict[str, tuple[list[str | Path], str]]:
    w, p = field
    small = write_png(tmp / "small.png", read_rgb(p)[:50])
    grey = tmp / "grey.png"
    cv2.imwrite(str(grey), read_rgb(p)[..., 1])
    deep = tmp / "deep.png"
    cv2.imwrite(str(deep), read_rgb(p).astype(np.uint16) * 257)
    truncated = tmp / "truncated.png"
    truncated.write_bytes(p.read_bytes()[:200])
    return {
        "shapes": ([w, small], "differ in shape"),
        "grayscale": ([w, grey], "grayscale"),
        "16-bit": ([w, deep], "16-bit"),
        "truncated": ([w, truncated], "truncated"),
        "missing": ([w, tmp / "nope.png"], "no such file"),
        "bad-json": ([w, p, "--params", "{bins: 3"], "--params: not valid JSON"),
        "not-an-object": ([w, p, "--params", "[1, 2]"], "expected a JSON object"),
        "bad-param": ([w, p, "--params", '{"bins": 1}'], "bins"),
        "unknown-param": ([w, p, "--params", '{"binz": 10}'], "binz"),
        "unknown-algorithm": ([w, p, "--algorithm", "omis-magic-v9"], "omis-magic-v9"),
        "one-image": ([w], "expected two images"),
        "bad-qc": ([w, p, "--qc", '{"min_focus": -1}'], "min_focus"),
    }


@pytest.mark.parametrize(
    "case",
    [
        "shapes", "grayscale", "16-bit", "truncated", "missing", "bad-json", "not-an-object",
        "bad-param", "unknown-param", "unknown-algorithm", "one-image", "bad-qc",
    ],
)  # fmt: skip
def test_bad_input_is_one_line_and_no_plot(
    case: str, field: tuple[Path, Path], tmp_path: Path
) -> None:
    args, needle = _bad_inputs(tmp_path, field)[case]
    plot = tmp_path / "out" / "plot.png"
    line = error_line(run(*args, "--plot", plot))
    assert needle in line
    assert not plot.parent.exists() or not any(plot.parent.iterdir())


@pytest.mark.parametrize("case", ["shapes", "grayscale", "16-bit", "truncated", "missing"])
def test_bad_file_with_quiet_logging_is_exactly_one_line(
    case: str, field: tuple[Path, Path], tmp_path: Path
) -> None:
    # Libraries must not add their own chatter (OpenCV warns about truncated PNGs on stderr).
    args, needle = _bad_inputs(tmp_path, field)[case]
    proc = run(*args, "-q")
    line = error_line(proc)
    assert needle in line
    assert proc.stderr.splitlines() == [line]


def test_all_fields_rejected_is_an_error(dark_field: tuple[Path, Path], tmp_path: Path) -> None:
    plot = tmp_path / "plot.png"
    plot.write_bytes(b"previous")
    line = error_line(run(*dark_field, "--plot", plot))
    assert "no field passed quality control" in line
    assert "field 0: dark" in line
    assert plot.read_bytes() == b"previous"  # an existing file is never half-replaced


def test_unsupported_plot_format(field: tuple[Path, Path], tmp_path: Path) -> None:
    line = error_line(run(*field, "--plot", tmp_path / "plot.gif"))
    assert "unsupported plot format" in line
    assert not (tmp_path / "plot.gif").exists()


def test_cuda_backend_fails_loudly_without_a_gpu(field: tuple[Path, Path]) -> None:
    proc = run(*field, "--backend", "cuda", "--json")
    if proc.returncode == 0:  # a machine with a usable GPU: it must really be CUDA
        assert json.loads(proc.stdout)["backend"] == "cuda"
        return
    line = error_line(proc)
    assert "cuda" in line.lower()
