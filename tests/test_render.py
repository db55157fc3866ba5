"""The CNN renderer: parameter validation, input errors, clipping, determinism."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import numpy as np
import pytest

from inference.exceptions import SpectrumInputError
from inference.render import (
    DEFAULT_Y_RANGE,
    RenderParams,
    fit_y_range,
    render_params_from_json,
    render_spectrum,
)

X = -144.5 + np.arange(290, dtype=np.float64)


def spectrum_y(scale: float = 15.0) -> np.ndarray:
    u = (X - 10.0) / 30.0
    return scale * np.where(np.abs(u) < 1.0, (1.0 - u * u) ** 2, 0.0)


def test_default_image_is_224_rgb_uint8() -> None:
    image = render_spectrum(X, spectrum_y())
    assert image.shape == (224, 224, 3)
    assert image.dtype == np.uint8
    assert RenderParams().version == "omis-render-v1"
    assert RenderParams().y_range == DEFAULT_Y_RANGE


def test_size_parameters_are_honoured() -> None:
    image = render_spectrum(X, spectrum_y(), RenderParams(width=100, height=50))
    assert image.shape == (50, 100, 3)


def test_repeated_renders_are_identical() -> None:
    a = render_spectrum(X, spectrum_y())
    b = render_spectrum(X.copy(), spectrum_y().copy())
    assert a.tobytes() == b.tobytes()


def test_render_is_identical_in_a_fresh_process() -> None:
    code = (
        "import hashlib, numpy as np\n"
        "from inference.render import render_spectrum\n"
        "x = -144.5 + np.arange(290, dtype=np.float64)\n"
        "u = (x - 10.0) / 30.0\n"
        "y = 15.0 * np.where(np.abs(u) < 1.0, (1.0 - u * u) ** 2, 0.0)\n"
        "print(hashlib.sha256(render_spectrum(x, y).tobytes()).hexdigest())\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    here = hashlib.sha256(render_spectrum(X, spectrum_y()).tobytes()).hexdigest()
    assert out.stdout.strip() == here


@pytest.mark.parametrize(
    "change",
    [
        {"line_width": 4},
        {"antialias": False},
        {"line_rgb": (255, 0, 0)},
        {"background_rgb": (0, 0, 0)},
        {"axis_rgb": (0, 0, 255)},
        {"draw_axes": False},
        {"draw_zero_line": False},
        {"fill_under": True},
        {"y_range": (-1.0, 20.0)},
        {"y_range": "auto"},
        {"x_range_nm": (-50.0, 50.0)},
        {"margin_px": 10},
    ],
)
def test_every_parameter_changes_the_image(change: dict[str, object]) -> None:
    base = render_spectrum(X, spectrum_y())
    changed = render_spectrum(X, spectrum_y(), RenderParams.model_validate(change))
    assert base.shape == changed.shape
    assert not np.array_equal(base, changed), change


def test_values_beyond_the_range_are_clipped_to_the_edge() -> None:
    params = RenderParams(draw_axes=False, draw_zero_line=False, antialias=False)
    at_edge = render_spectrum(X, spectrum_y(DEFAULT_Y_RANGE[1]), params)
    beyond = render_spectrum(X, spectrum_y(10 * DEFAULT_Y_RANGE[1]), params)
    # the tall one runs along the top edge: more dark pixels in the top rows than the other,
    # but never outside the plot area
    top = params.margin_px
    assert beyond[top, :, 0].tolist().count(0) > at_edge[top, :, 0].tolist().count(0)
    assert (beyond[: top - 1] == 255).all()


def test_the_line_sits_where_the_value_says() -> None:
    params = RenderParams(draw_axes=False, draw_zero_line=False, antialias=False, line_width=1)
    lo, hi = DEFAULT_Y_RANGE
    flat = np.full(X.shape, lo + 0.75 * (hi - lo))  # three quarters up the range
    image = render_spectrum(X, flat, params)
    dark_rows = np.unique(np.nonzero(image[..., 0] < 128)[0])
    top, bottom = params.margin_px, params.height - 1 - params.margin_px
    expected = top + (bottom - top) * 0.25
    assert dark_rows.size <= 2
    assert abs(dark_rows.mean() - expected) <= 1.0


@pytest.mark.parametrize(
    ("x", "y", "needle"),
    [
        (X, np.where(X > 0, np.nan, 0.0), "y contains"),
        (X, np.where(X > 0, np.inf, 0.0), "inf"),
        (np.where(X > 0, np.nan, X), np.zeros(290), "x_nm contains"),
        (X, np.zeros(10), "differ in length"),
        (X[::-1].copy(), np.zeros(290), "strictly increasing"),
        (X[:1], np.zeros(1), "at least 2"),
        (X, np.zeros((290, 2)), "1-D"),
    ],
)
def test_bad_input_is_an_error_naming_it(x: np.ndarray, y: np.ndarray, needle: str) -> None:
    with pytest.raises(SpectrumInputError, match=needle):
        render_spectrum(x, y)


def test_params_are_frozen_and_round_trip_through_json() -> None:
    params = RenderParams(width=128, y_range=(-3.0, 1.0), x_range_nm=(-100.0, 120.0))
    with pytest.raises(ValueError, match="frozen"):
        params.width = 64  # type: ignore[misc]
    again = render_params_from_json(json.loads(json.dumps(params.model_dump())))
    assert again == params
    assert (
        render_spectrum(X, spectrum_y(), again).tobytes()
        == render_spectrum(X, spectrum_y(), params).tobytes()
    )


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        ({"colour": 3}, "colour"),
        ({"width": 4}, "width"),
        ({"line_width": 0}, "line_width"),
        ({"line_rgb": [0, 0, 300]}, "line_rgb"),
        ({"y_range": [1.0, -1.0]}, "increasing"),
        ({"y_range": [0.0, float("inf")]}, "finite"),
        ({"y_range": "tight"}, "y_range"),
        ({"x_range_nm": [5.0, 5.0]}, "x_range_nm"),
        ({"margin_px": 60, "width": 100}, "margin_px"),
        ({"version": "omis-render-v9"}, "omis-render-v9"),
    ],
)
def test_bad_params_name_the_key(data: dict[str, object], needle: str) -> None:
    with pytest.raises(SpectrumInputError, match=needle):
        render_params_from_json(data)


def test_fit_y_range_covers_the_data_and_zero() -> None:
    ys = np.stack([spectrum_y(s) for s in (5.0, 10.0, -3.0)])
    lo, hi = fit_y_range(ys, coverage=1.0, pad=0.0)
    assert (lo, hi) == (float(ys.min()), float(ys.max()))
    positive = np.stack([spectrum_y(s) + 1.0 for s in (5.0, 10.0)])
    lo, hi = fit_y_range(positive, coverage=0.99, pad=0.1)
    assert lo < 0.0 < float(positive.max()) * 0.9 < hi  # zero stays in view
    with pytest.raises(SpectrumInputError):
        fit_y_range([np.nan])


def test_fit_x_range_covers_where_the_spectra_live() -> None:
    from inference.render import fit_x_range

    x = np.linspace(-144.5, 144.5, 290)
    ys = np.stack([np.exp(-0.5 * ((x - c) / 3.0) ** 2) for c in (-10.0, 0.0, 5.0)])
    lo, hi = fit_x_range(x, ys)
    assert -30.0 < lo < -10.0 and 5.0 < hi < 25.0
    # nothing there: the whole axis; bad input: an error naming it
    assert fit_x_range(x, np.zeros((2, 290))) == (x[0], x[-1])
    with pytest.raises(SpectrumInputError, match="fit_x_range"):
        fit_x_range(x, np.zeros((2, 10)))
