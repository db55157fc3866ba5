"""Per-field quality control on constructed fields: good, dark, saturated, blurred, shifted."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from inference.exceptions import BackendUnavailableError, SpectrumInputError
from inference.spectrum import NumpyBackend, compute_spectrum, open_backend, parse_params
from inference.spectrum.qc import (
    FieldQuality,
    NoUsableFieldError,
    QCThresholds,
    SlideQC,
    assess_field,
    compute_slide_spectrum,
    qc_thresholds_from_json,
    registration,
)

PARAMS = parse_params()


def make_field(
    seed: int, h: int = 160, w: int = 224, shift: tuple[int, int] = (0, 0)
) -> tuple[np.ndarray, np.ndarray]:
    """A W/P pair of 'cells' (stained ellipses with nuclei) on glass, P darker and re-tinted.

    ``shift`` = (dy, dx) moves P's view against W's, as a misregistered stage would.
    """
    rng = np.random.default_rng(seed)
    pad = 16
    big_w = np.empty((h + 2 * pad, w + 2 * pad, 3), np.float64)
    big_p = np.empty_like(big_w)
    big_w[:] = (200, 185, 205)
    big_p[:] = (90, 80, 110)
    for _ in range(30):
        centre = (int(rng.integers(0, w + 2 * pad)), int(rng.integers(0, h + 2 * pad)))
        axes = (int(rng.integers(6, 20)), int(rng.integers(6, 20)))
        angle = float(rng.uniform(0, 180))
        colour = rng.uniform(60, 170, 3)
        tint = colour * 0.6 + rng.uniform(-15, 15, 3)
        cv2.ellipse(big_w, centre, axes, angle, 0, 360, colour.tolist(), -1)
        cv2.ellipse(big_p, centre, axes, angle, 0, 360, tint.tolist(), -1)
        cv2.circle(big_w, centre, max(2, axes[0] // 4), (40, 30, 90), -1)
        cv2.circle(big_p, centre, max(2, axes[0] // 4), (30, 25, 70), -1)
    big_w += rng.normal(0, 3, big_w.shape)
    big_p += rng.normal(0, 3, big_p.shape)
    dy, dx = shift
    w_img = big_w[pad : pad + h, pad : pad + w]
    p_img = big_p[pad + dy : pad + dy + h, pad + dx : pad + dx + w]
    return (
        np.clip(w_img, 0, 255).astype(np.uint8),
        np.clip(p_img, 0, 255).astype(np.uint8),
    )


def scaled(img: np.ndarray, factor: float) -> np.ndarray:
    return np.clip(img.astype(np.float64) * factor, 0, 255).astype(np.uint8)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_good_field_is_ok(seed: int) -> None:
    q = assess_field(*make_field(seed), PARAMS, index=3)
    assert q.verdict == "ok", q
    assert q.reasons == ()
    assert q.index == 3
    assert q.valid_fraction > 0.9
    assert q.dark_fraction < 0.05
    assert q.saturated_fraction == 0.0
    assert q.shift_fraction < QCThresholds().max_shift_fraction
    assert q.registration_response > 0.5
    assert q.focus > QCThresholds().min_focus


def test_dark_field_is_rejected_as_dark() -> None:
    w, p = make_field(4)
    q = assess_field(scaled(w, 0.08), scaled(p, 0.08), PARAMS)
    assert q.verdict == "reject"
    assert "dark" in q.reasons
    assert q.dark_fraction > 0.9


def test_black_field_is_dark_and_has_no_valid_pixels() -> None:
    black = np.zeros((64, 80, 3), np.uint8)
    q = assess_field(black, black, PARAMS)
    assert q.valid_fraction == 0.0
    assert {"dark", "low_valid_fraction", "out_of_focus"} <= set(q.reasons)


def test_overexposed_field_is_rejected_as_saturated() -> None:
    w, p = make_field(5)
    q = assess_field(scaled(w, 2.0), p, PARAMS)
    assert q.verdict == "reject"
    assert "saturated" in q.reasons
    assert "low_valid_fraction" in q.reasons
    assert q.saturated_fraction > 0.5


def test_blurred_field_is_rejected_as_out_of_focus() -> None:
    w, p = make_field(6)
    sharp = assess_field(w, p, PARAMS)
    blur_w = np.asarray(cv2.GaussianBlur(w, (0, 0), 3), dtype=np.uint8)
    blur_p = np.asarray(cv2.GaussianBlur(p, (0, 0), 3), dtype=np.uint8)
    q = assess_field(blur_w, blur_p, PARAMS)
    assert q.reasons == ("out_of_focus",)
    assert q.focus < sharp.focus / 5


@pytest.mark.parametrize(("dy", "dx"), [(0, 4), (3, 4), (-6, 0)])
def test_shifted_field_is_rejected_as_misregistered(dy: int, dx: int) -> None:
    q = assess_field(*make_field(7, shift=(dy, dx)), PARAMS)
    assert q.reasons == ("misregistered",)
    assert q.shift_px == pytest.approx(float(np.hypot(dx, dy)), abs=0.6)


def test_p_of_another_field_is_misregistered() -> None:
    w, _ = make_field(8)
    _, other_p = make_field(9)
    assert "misregistered" in assess_field(w, other_p, PARAMS).reasons


def test_registration_measures_shift_in_full_resolution_pixels() -> None:
    """Large fields are reduced before phase correlation; the shift is scaled back."""
    w, p = make_field(10, h=800, w=1024, shift=(0, 6))
    shift, response = registration(w, p)
    assert shift == pytest.approx(6.0, abs=0.6)
    assert response > 0.3


@pytest.mark.parametrize("width", [375, 612, 625])
def test_no_half_pixel_bias_at_odd_dft_sizes(width: int) -> None:
    """cv2.phaseCorrelate is half a pixel off when the DFT size it pads to is odd (375 and 625
    are odd DFT sizes, 612 pads to 625; a 5 MP field used to be halved to 612): QC crops to
    even sizes.  The shift is in full-resolution pixels; registration runs at 256-511 px."""
    w, p = make_field(20, h=300, w=width)
    shift, response = registration(w, p)
    assert shift < 0.15 * max(1.0, width / 256), shift
    assert response > 0.5


def test_slide_qc_is_the_slide_spectrum_with_qc() -> None:
    """SlideQC, fed the caller's histograms, gives exactly what compute_slide_spectrum does."""
    fields = [make_field(21), tuple(scaled(img, 0.05) for img in make_field(22)), make_field(23)]
    expected = compute_slide_spectrum(fields, PARAMS, "numpy")  # type: ignore[arg-type]
    slide = SlideQC(PARAMS)
    for w, p in fields:
        slide.add(w, p, NumpyBackend().histogram(w, p, PARAMS))
    got = slide.finish("numpy")
    assert got.to_json() == expected.to_json()
    assert got.used == (0, 2)


def test_no_usable_field_error_carries_every_verdict() -> None:
    slide = SlideQC(PARAMS)
    dark = [scaled(img, 0.05) for img in make_field(24)]
    slide.add(dark[0], dark[1], NumpyBackend().histogram(dark[0], dark[1], PARAMS), index=7)
    with pytest.raises(NoUsableFieldError, match="field 7: dark") as info:
        slide.finish("numpy")
    assert [q.index for q in info.value.fields] == [7]


def test_exact_valid_fraction_from_the_histogram() -> None:
    w, p = make_field(11)
    w = w.copy()
    w[:40] = 255  # saturate the top quarter
    h = NumpyBackend().histogram(w, p, PARAMS)
    q = assess_field(w, p, PARAMS, histogram=h)
    assert q.valid_fraction == h.valid_pixels / h.total_pixels
    assert q.valid_fraction == pytest.approx(0.75, abs=0.01)


def test_thresholds_are_configurable() -> None:
    field = make_field(12)
    assert assess_field(*field, PARAMS).ok
    strict = QCThresholds(min_focus=10.0)
    assert assess_field(*field, PARAMS, strict).reasons == ("out_of_focus",)
    lenient = QCThresholds(max_shift_fraction=0.5)
    assert assess_field(*make_field(12, shift=(0, 5)), PARAMS, lenient).ok


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        ({"min_focus": -1}, "min_focus"),
        ({"max_dark_fraction": 2}, "max_dark_fraction"),
        ({"min_sharpness": 0.1}, "min_sharpness"),
    ],
)
def test_bad_thresholds_name_the_key(data: dict[str, object], needle: str) -> None:
    with pytest.raises(SpectrumInputError, match=needle):
        qc_thresholds_from_json(data)


def test_every_threshold_has_a_description() -> None:
    for name, info in QCThresholds.model_fields.items():
        assert info.description, name


def test_field_quality_json() -> None:
    q = assess_field(*make_field(13), PARAMS, index=0)
    data = q.to_json()
    assert set(data) == {
        "index",
        "valid_fraction",
        "saturated_fraction",
        "dark_fraction",
        "focus",
        "shift_px",
        "shift_fraction",
        "registration_response",
        "verdict",
        "reasons",
        "checks",
    }
    assert data["verdict"] == "ok"
    assert data["reasons"] == []
    assert isinstance(q, FieldQuality)


def test_slide_spectrum_leaves_rejected_fields_out_and_flags_it() -> None:
    good_a, good_b = make_field(14), make_field(15)
    dark = tuple(scaled(img, 0.05) for img in make_field(16))
    result = compute_slide_spectrum([good_a, dark, good_b], PARAMS, "numpy")  # type: ignore[list-item]
    assert [q.verdict for q in result.fields] == ["ok", "reject", "ok"]
    assert result.used == (0, 2)
    assert "fields_excluded" in result.spectrum.flags
    only_good = compute_spectrum([good_a, good_b], PARAMS, backend="numpy")
    assert np.array_equal(result.spectrum.hist, only_good.hist)
    assert result.spectrum.valid_pixels == only_good.valid_pixels
    data = result.to_json()
    assert [f["index"] for f in data["fields"]] == [0, 1, 2]
    assert data["fields"][1]["reasons"] == ["dark"]
    assert data["fields_used"] == [0, 2]
    assert data["backend"] == "numpy"


def test_slide_spectrum_without_rejections_has_no_flag() -> None:
    result = compute_slide_spectrum([make_field(17)], PARAMS, "numpy")
    assert result.spectrum.flags == ()
    assert result.used == (0,)


def test_slide_spectrum_fails_when_no_field_passes() -> None:
    dark = tuple(scaled(img, 0.05) for img in make_field(18))
    with pytest.raises(SpectrumInputError, match=r"no field passed quality control.*field 0: dark"):
        compute_slide_spectrum([dark], PARAMS, "numpy")  # type: ignore[list-item]


def test_slide_spectrum_names_the_bad_field() -> None:
    w, p = make_field(19)
    with pytest.raises(SpectrumInputError, match="field 1: W and P differ in shape"):
        compute_slide_spectrum([(w, p), (w, p[:-1])], PARAMS, "numpy")


def test_cuda_backend_never_falls_back() -> None:
    """On a machine without a usable GPU this is an error; where CUDA works it is CUDA."""
    try:
        backend = open_backend("cuda")
    except BackendUnavailableError as exc:
        assert "cuda" in str(exc)
    else:
        try:
            assert backend.name == "cuda"
        finally:
            backend.close()


def test_auto_backend_always_opens() -> None:
    backend = open_backend("auto")
    try:
        assert backend.name in ("numpy", "cuda")
    finally:
        backend.close()


@pytest.mark.parametrize("shape", [(1, 1), (1, 5), (4, 6)])
def test_field_too_small_to_register_is_rejected_not_crashed(shape: tuple[int, int]) -> None:
    img = np.full((*shape, 3), 120, np.uint8)
    q = assess_field(img, img, PARAMS)
    assert q.verdict == "reject"
    assert "misregistered" in q.reasons
    assert q.registration_response == 0.0
