"""Field-pair acquisition end to end: sim:// (real pty), replay://, and ``omis acquire``."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from firmware_bridge.acquisition import FieldPair, ScanPlan
from firmware_bridge.base import Illumination
from firmware_bridge.camera import OpenCVCamera
from firmware_bridge.exceptions import BridgeInitError, BridgeTimeoutError, InputError
from firmware_bridge.images import read_rgb, write_png
from firmware_bridge.microscope import SimMicroscope, open_microscope
from firmware_bridge.microscope_base import record_acquisition

SIZE = (160, 128)
SIM = "sim://?seed=4&speed=200000&settle_ms=1"
PLAN = ScanPlan(fields=3, pattern="serpentine", origin_um=(4000, 4000), step_um=(700, 700))
OMIS = [sys.executable, "-m", "deploy.cli"]


@pytest.fixture
def scope() -> Iterator[SimMicroscope]:
    with open_microscope(SIM, size=SIZE) as m:
        assert isinstance(m, SimMicroscope)
        yield m


def test_plans_visit_the_expected_positions() -> None:
    grid = ScanPlan(fields=5, pattern="grid", origin_um=(0, 0), step_um=(10, 20), columns=2)
    snake = grid.model_copy(update={"pattern": "serpentine"})
    assert [(q.x_um, q.y_um) for q in grid.positions()] == [
        (0, 0), (10, 0), (0, 20), (10, 20), (0, 40)
    ]  # fmt: skip
    assert [(q.x_um, q.y_um) for q in snake.positions()] == [
        (0, 0), (10, 0), (10, 20), (0, 20), (0, 40)
    ]  # fmt: skip


def test_sim_acquisition_gives_real_pairs_and_leaves_leds_off(scope: SimMicroscope) -> None:
    seen: list[int] = []

    def qc(pair: FieldPair) -> dict[str, Any]:
        seen.append(pair.index)
        assert scope.firmware.snapshot().illumination == Illumination.OFF
        return {"ok": True, "mean_w": float(pair.diffuse.mean())}

    pairs = list(scope.acquire_fields(PLAN, qc=qc))
    assert seen == [0, 1, 2]
    for pair, pos in zip(pairs, PLAN.positions(), strict=True):
        assert pair.diffuse.shape == (128, 160, 3) and pair.diffuse.dtype == np.uint8
        assert pair.reported_position == pos
        assert pair.diffuse.mean() > 40 and not np.array_equal(pair.diffuse, pair.polarized)
        assert {"move", "settle", "diffuse", "polarized", "off", "qc"} <= set(pair.timings_ms)
        assert pair.qc is not None and pair.qc["ok"]
    # Different fields show different cells.
    assert not np.array_equal(pairs[0].diffuse, pairs[1].diffuse)
    assert scope.firmware.snapshot().illumination == Illumination.OFF


def test_synthetic_camera_reads_the_hardware_not_the_host(scope: SimMicroscope) -> None:
    cam, ctl = scope.camera, scope.controller
    ctl.home()
    assert cam.capture().mean() < 10  # LEDs off: dark frame
    ctl.set_illumination(Illumination.DIFFUSE)
    assert cam.capture().mean() > 40
    scope.firmware.brownout()  # the host still believes the LEDs are on
    assert cam.capture().mean() < 10


def test_reset_during_a_scan_rehomes_and_retakes_the_field(scope: SimMicroscope) -> None:
    def qc(pair: FieldPair) -> None:
        if pair.index == 0:
            scope.firmware.brownout()

    pairs = list(scope.acquire_fields(PLAN, qc=qc))
    assert [p.index for p in pairs] == [0, 1, 2]
    assert scope.controller.info.boot_count == 2
    assert all(p.diffuse.mean() > 40 for p in pairs)


def test_prefetch_overlaps_and_stops_cleanly(scope: SimMicroscope) -> None:
    pairs = list(scope.acquire_fields(PLAN, prefetch=1))
    assert [p.index for p in pairs] == [0, 1, 2]
    it = scope.acquire_fields(PLAN, prefetch=1)
    next(it)
    it.close()  # type: ignore[attr-defined]
    assert not any(t.name == "acquisition" for t in threading.enumerate())
    assert scope.firmware.snapshot().illumination == Illumination.OFF


def test_record_and_replay_round_trip(scope: SimMicroscope, tmp_path: Path) -> None:
    out = tmp_path / "acq"
    meta = record_acquisition(scope, PLAN, out)
    assert meta["microscope"]["firmware"]["version"] == "1.2.0"
    assert meta["microscope"]["simulation"]["slide_id"] == "sim4-0000"
    names = sorted(os.listdir(out))
    assert names == ["acquisition.json"] + [
        f"field-{i:03d}-{kind}.png" for i in range(3) for kind in ("diffuse", "polarized")
    ]
    with open_microscope(f"replay://{out}") as replay:
        pairs = list(replay.acquire_fields(replay.default_plan(3)))
        assert replay.describe()["recorded"]["kind"] == "sim"
    assert [p.position for p in pairs] == PLAN.positions()
    assert np.array_equal(pairs[2].polarized, read_rgb(out / "field-002-polarized.png"))
    with pytest.raises(InputError, match="only 3 recorded"):
        list(replay.acquire_fields(ScanPlan(fields=4)))


def test_failed_acquisition_leaves_no_output(scope: SimMicroscope, tmp_path: Path) -> None:
    scope.controller.config.move_timeout_margin_s = 0.2
    scope.firmware.set_stuck_stage()
    out = tmp_path / "acq"
    with pytest.raises(BridgeTimeoutError):
        record_acquisition(scope, PLAN, out)
    assert not out.exists() and os.listdir(tmp_path) == []
    assert scope.firmware.snapshot().illumination == Illumination.OFF


def test_replay_of_a_dataset_manifest(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    rows = []
    for slide in ("s1", "s2"):
        for field in range(2):
            w, p = (rng.integers(0, 255, (16, 24, 3), dtype=np.uint8) for _ in range(2))
            write_png(tmp_path / slide / f"{field}-w.png", w)
            write_png(tmp_path / slide / f"{field}-p.png", p)
            rows.append(
                [
                    slide,
                    f"pt-{slide}",
                    "III",
                    field,
                    f"{slide}/{field}-w.png",
                    f"{slide}/{field}-p.png",
                ]
            )
    with (tmp_path / "manifest.csv").open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["slide_id", "patient_id", "pap_group", "field", "diffuse", "polarized"])
        writer.writerows(rows)
    with open_microscope(f"replay://{tmp_path}?slide=s2") as m:
        pairs = list(m.acquire_fields(m.default_plan(5)))
        assert m.describe()["slide_id"] == "s2" and m.describe()["pap_group"] == "III"
    assert len(pairs) == 2
    assert np.array_equal(pairs[1].diffuse, read_rgb(tmp_path / "s2" / "1-w.png"))
    with pytest.raises(InputError, match="no slide 'nope'"):
        open_microscope(f"replay://{tmp_path}?slide=nope")


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("ftp://x", "unknown scheme"),
        ("sim://?colour=red", "unknown option"),
        ("sim://?fault=melt:1", "unknown fault"),
        ("replay:///nonexistent/dir", "is not a directory"),
    ],
)
def test_bad_urls_are_input_errors(url: str, message: str) -> None:
    with pytest.raises(InputError, match=message):
        open_microscope(url)


def test_missing_camera_names_what_was_tried() -> None:
    with pytest.raises(BridgeInitError, match=r"/dev/video99.*v4l2"):
        OpenCVCamera("/dev/video99").open()


def test_opencv_camera_converts_bgr_to_rgb(tmp_path: Path) -> None:
    video = tmp_path / "red.avi"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter.fourcc(*"MJPG"), 10, (32, 24))
    for _ in range(6):
        writer.write(np.full((24, 32, 3), (0, 0, 255), np.uint8))  # pure red, in BGR order
    writer.release()
    with OpenCVCamera(str(video), backend="any", flush_frames=1, size=(32, 24)) as cam:
        cam.flush()
        frame = cam.capture()
        assert cam.settings.verified["size"]
    assert frame.shape == (24, 32, 3)
    r, g, b = frame.reshape(-1, 3).mean(axis=0)
    assert r > 200 and g < 40 and b < 40


class _SlowCapture:
    """Wraps a real ``cv2.VideoCapture`` so that ``read`` hangs like a stalled driver."""

    def __init__(self, cap: Any, delay_s: float) -> None:
        self.cap = cap
        self.delay_s = delay_s

    def read(self) -> Any:
        time.sleep(self.delay_s)
        return self.cap.read()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.cap, name)


def test_opencv_capture_honours_its_timeout(tmp_path: Path) -> None:
    video = tmp_path / "grey.avi"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter.fourcc(*"MJPG"), 10, (32, 24))
    for _ in range(6):
        writer.write(np.full((24, 32, 3), 128, np.uint8))
    writer.release()
    with OpenCVCamera(str(video), backend="any", size=(32, 24), read_timeout_s=5.0) as cam:
        cam._cap = _SlowCapture(cam._cap, delay_s=0.6)
        start = time.monotonic()
        with pytest.raises(BridgeTimeoutError, match=r"more than 0\.1 s"):
            cam.capture(timeout_s=0.1)
        assert time.monotonic() - start < 0.5  # the caller's limit, not read_timeout_s


def run_omis(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*OMIS, *args],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).parents[1],
    )


def test_omis_acquire_writes_pairs_and_metadata(tmp_path: Path) -> None:
    out = tmp_path / "scan"
    proc = run_omis(
        "acquire", "--microscope", SIM, "--fields", "2", "--out", str(out),
        "--size", "160x128", "--plan", "grid", "--json", "-q",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    meta = json.loads(proc.stdout)
    assert meta["plan"]["pattern"] == "grid" and len(meta["fields"]) == 2
    on_disk = json.loads((out / "acquisition.json").read_text())
    assert on_disk["fields"][1]["diffuse"] == "field-001-diffuse.png"
    assert on_disk["microscope"]["firmware"]["name"] == "omis-sim"
    assert read_rgb(out / "field-001-polarized.png").shape == (128, 160, 3)
    # every field carries the device's quality-control verdict
    for field in on_disk["fields"]:
        assert field["qc"]["verdict"] in ("ok", "reject")
        assert 0.0 <= field["qc"]["valid_fraction"] <= 1.0


def test_omis_acquire_bad_port_fails_cleanly(tmp_path: Path) -> None:
    out = tmp_path / "scan"
    proc = run_omis("acquire", "--microscope", "serial:///dev/ttyNOPE", "--fields", "2",
                    "--out", str(out))  # fmt: skip
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "/dev/ttyNOPE" in lines[0], proc.stderr
    assert not out.exists() and os.listdir(tmp_path) == []


@pytest.mark.parametrize("option", ["exposure_ms=fast", "settle_ms=soon"])
def test_bad_camera_option_leaks_no_simulated_firmware(option: str) -> None:
    # The camera options are parsed after the simulated firmware started: it must be closed.
    with pytest.raises(InputError, match="is not a number"):
        open_microscope(f"sim://?{option}")
    assert not any(t.name == "sim-firmware" and t.is_alive() for t in threading.enumerate())


def test_a_failed_move_leaves_the_stage_halted_and_the_leds_off(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A move that fails other than by its own timeout (the link drops while polling) may
    still be running on the firmware: acquisition must stop it, not just switch the LEDs off."""
    from firmware_bridge.exceptions import LinkDownError

    with open_microscope("sim://?seed=1&speed=200", size=(64, 48)) as scope:
        assert isinstance(scope, SimMicroscope)
        real_move = scope.controller.move_to

        def move_then_lose_the_link(pos: Any, *, wait: bool = True, timeout_s: Any = None) -> None:
            real_move(pos, wait=False)  # the firmware starts a slow move ...
            raise LinkDownError("link lost while the stage moved (test)")  # ... then silence

        monkeypatch.setattr(scope.controller, "move_to", move_then_lose_the_link)
        with pytest.raises(LinkDownError):
            list(scope.acquire_fields(scope.default_plan(2, "grid")))
        state = scope.firmware.snapshot()
        assert not state.moving, "the stage was left running"
        assert state.illumination is Illumination.OFF
