"""The device path at camera resolution: QC verdicts do not depend on the sensor's pixel count.

The simulator's field of view is fixed in micrometres, so a 640x480 and a 2448x2048 (5 MP) frame
of one stage position show the same cells; quality control must then reach the same verdict,
and that verdict must be the simulator's ground truth.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from fakes.bundles import make_bundle

from firmware_bridge.sim.sample import SimConfig, SyntheticSlide, slide_for
from inference.backends import InferenceBackend, load_backend
from inference.bundle import Bundle
from inference.pipeline import PipelineConfig, SlidePipeline
from inference.selftest import FIELD_STEP_UM, simulated_field, simulated_slide
from inference.spectrum import parse_params
from inference.spectrum.qc import FieldQuality, assess_field

CAMERA = (2448, 2048)
SIZES = [(640, 480), (1280, 1024), (1920, 1080), CAMERA]
PARAMS = parse_params()
# QC's reason for each simulated fault
EXPECTED = {
    "ok": (),
    "dark": ("dark",),
    "saturated": ("saturated", "low_valid_fraction"),
    "defocus": ("out_of_focus",),
    "misregistered": ("misregistered",),
}


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Bundle:
    return make_bundle(tmp_path_factory.mktemp("b") / "bundle")


@pytest.fixture
def backend(bundle: Bundle) -> Iterator[InferenceBackend]:
    with load_backend("onnxruntime", bundle) as b:
        yield b


def _one_field_of_each_fault() -> tuple[SyntheticSlide, dict[str, tuple[float, float]]]:
    """A slide with every fault common, and a stage position showing each fault."""
    rates = {
        "saturated_rate": 0.2,
        "dark_rate": 0.2,
        "defocus_rate": 0.2,
        "misregistration_rate": 0.2,
    }
    slide = SyntheticSlide("faults", "III", 11, SimConfig(**rates))
    found: dict[str, tuple[float, float]] = {}
    for k in range(200):
        pos = (1000.0 + 700.0 * k, 500.0)
        found.setdefault(slide.field_fault(*pos), pos)
        if len(found) == len(EXPECTED):
            return slide, found
    raise AssertionError(f"faults found: {sorted(found)}")


FAULTY_SLIDE, POSITIONS = _one_field_of_each_fault()


@pytest.mark.parametrize("size", SIZES, ids=[f"{w}x{h}" for w, h in SIZES])
@pytest.mark.parametrize("fault", sorted(EXPECTED))
def test_qc_finds_the_simulated_fault_at_every_resolution(
    fault: str, size: tuple[int, int]
) -> None:
    w, p = FAULTY_SLIDE.render_pair(*POSITIONS[fault], size=size)
    check_verdict(fault, assess_field(w, p, PARAMS))


def check_verdict(fault: str, q: FieldQuality) -> None:
    """Good and misregistered fields get exactly their reasons; a dark, saturated or blurred
    field may carry further ones (registration cannot be confirmed on it either)."""
    assert set(q.reasons) >= set(EXPECTED[fault]), (fault, q)
    if fault in ("ok", "misregistered"):
        assert q.reasons == EXPECTED[fault], (fault, q)


@pytest.mark.parametrize("slide", [0, 1, 2])
def test_good_fields_pass_at_camera_resolution(slide: int) -> None:
    """The fields ``omis bench`` scans: every one the simulator made without a fault passes."""
    for i in range(2):
        w, p = simulated_field(slide, i, CAMERA)
        check_verdict(simulated_fault(slide, i), assess_field(w, p, PARAMS))


def simulated_fault(slide: int, index: int) -> str:
    """The simulator's ground truth for ``simulated_field(slide, index, ...)``."""
    return slide_for(slide, 0).field_fault(index * FIELD_STEP_UM, 0.0)


def test_pipeline_scans_simulated_slides_at_5_mp(bundle: Bundle, backend: InferenceBackend) -> None:
    pipe = SlidePipeline(bundle, backend, PipelineConfig(spectrum_backend="numpy"))
    slides = [simulated_slide(s, 2, CAMERA) for s in (1, 2)]
    results = list(pipe.run(slides))
    assert len(results) == 2
    for r in results:
        assert [q.verdict for q in r.fields] == ["ok", "ok"]
        assert r.spectrum.total_pixels == 2 * CAMERA[0] * CAMERA[1]
        assert r.label in ("low", "high")


def test_bench_runs_at_camera_resolution(tmp_path: Path, bundle: Bundle) -> None:
    env = {**os.environ, "OMIS_STATE_DIR": str(tmp_path / "state")}
    cmd = [sys.executable, "-m", "deploy.cli", "bench", "-q", "--bundle", str(bundle.root)]
    cmd += ["--size", "2448x2048", "--fields", "1", "--slides", "1", "--json"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, check=False)
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert data["size"] == [2448, 2048] and data["fields"] == 1
    assert data["stages"]["qc"]["median_ms"] > 0 and data["stages"]["spectrum"]["median_ms"] > 0
