"""Golden images of the CNN renderer: fixed spectra must render to exactly the stored pixels.

The spectra are built with exact IEEE arithmetic only (polynomial bumps, no exp/sin whose last
bit may differ between machines), so any difference is the renderer's.

Regenerate after an intended change of a *new* render version (never for omis-render-v1):

    OMIS_UPDATE_GOLDEN=1 .venv/bin/pytest tests/test_render_golden.py
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from firmware_bridge.images import read_rgb, write_png
from inference.render import RenderParams, render_spectrum

GOLDEN = Path(__file__).parent / "golden" / "render"
UPDATE = os.environ.get("OMIS_UPDATE_GOLDEN") == "1"


def bump(x: np.ndarray, centre: float, half_width: float) -> np.ndarray:
    """(1 - u^2)^2 for |u| < 1, u = (x - centre) / half_width: smooth, exact arithmetic."""
    u = (x - centre) / half_width
    return np.where(np.abs(u) < 1.0, (1.0 - u * u) ** 2, 0.0)


def wdiff_axis() -> np.ndarray:
    return -144.5 + np.arange(290, dtype=np.float64)  # the default omis-wdiff-v1 bin centres


def case_peaks() -> tuple[np.ndarray, np.ndarray, RenderParams]:
    x = wdiff_axis()
    return x, 18.0 * bump(x, 2.0, 12.0) - 3.0 * bump(x, -60.0, 45.0), RenderParams()


def case_clipped_fill() -> tuple[np.ndarray, np.ndarray, RenderParams]:
    x = wdiff_axis()
    y = 35.0 * bump(x, 0.0, 40.0) - 8.0 * bump(x, 90.0, 20.0) + 5.0 * bump(x, -100.0, 30.0)
    params = RenderParams(antialias=False, line_width=1, fill_under=True)
    return x, y, params


def case_auto_small() -> tuple[np.ndarray, np.ndarray, RenderParams]:
    x = np.arange(-255, 256, dtype=np.float64) * 145.0 / 255.0  # the omis-rbhist-v1 axis
    y = 0.02 * bump(x, -30.0, 50.0) - 0.01 * bump(x, 40.0, 25.0)
    params = RenderParams(
        width=96,
        height=64,
        margin_px=2,
        y_range="auto",
        line_width=3,
        line_rgb=(200, 30, 30),
        background_rgb=(10, 10, 40),
        draw_axes=False,
        x_range_nm=(-100.0, 100.0),
    )
    return x, y, params


CASES = {
    "peaks": case_peaks,
    "clipped_fill": case_clipped_fill,
    "auto_small": case_auto_small,
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_render_matches_golden(name: str) -> None:
    x, y, params = CASES[name]()
    image = render_spectrum(x, y, params)
    path = GOLDEN / f"{name}.png"
    if UPDATE:
        write_png(path, image)
    golden = read_rgb(path)
    assert golden.shape == image.shape
    differing = int(np.any(golden != image, axis=2).sum())
    assert differing == 0, f"{name}: {differing} pixels differ from {path}"
    assert golden.tobytes() == image.tobytes()


def test_golden_files_have_no_strays() -> None:
    """Every stored golden image belongs to a case (a renamed case leaves no stale file)."""
    stored = {p.stem for p in GOLDEN.glob("*.png")}
    assert stored == set(CASES)
