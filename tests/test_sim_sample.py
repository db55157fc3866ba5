"""The synthetic Pap smear: determinism, illumination, W/P alignment, groups, faults."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from firmware_bridge.exceptions import InputError
from firmware_bridge.sim.sample import (
    PAP_GROUPS,
    RISK,
    STUDY_COUNTS,
    SimConfig,
    SyntheticSlide,
    group_for,
    scale_counts,
    slide_for,
)

SIZE = (160, 128)
NO_FAULTS = SimConfig(saturated_rate=0, dark_rate=0, defocus_rate=0, misregistration_rate=0)


def _gray(img: np.ndarray) -> np.ndarray:
    out: np.ndarray = img.astype(np.float64).mean(axis=2)
    return out


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(_gray(a).ravel(), _gray(b).ravel())[0, 1])


def test_public_constants() -> None:
    assert PAP_GROUPS == ("II", "III", "IV", "V")
    assert STUDY_COUNTS == {"II": 141, "III": 112, "IV": 42, "V": 146}
    assert {g: RISK[g] for g in PAP_GROUPS} == {
        "II": "low",
        "III": "low",
        "IV": "high",
        "V": "high",
    }


def test_same_seed_same_pixels_different_seed_differs() -> None:
    a = SyntheticSlide("a", "III", seed=11).render_pair(1000.0, 2000.0, SIZE)
    b = SyntheticSlide("b", "III", seed=11).render_pair(1000.0, 2000.0, SIZE)
    c = SyntheticSlide("c", "III", seed=12).render_pair(1000.0, 2000.0, SIZE)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a[0], c[0])
    assert a[0].dtype == np.uint8
    assert a[0].shape == (SIZE[1], SIZE[0], 3)


def test_render_does_not_depend_on_call_history() -> None:
    slide = SyntheticSlide("a", "V", seed=3)
    first = slide.render_field(500.0, 500.0, "polarized", SIZE)
    slide.render_field(9000.0, -4000.0, "diffuse", (320, 256))
    slide.render_field(500.0, 500.0, "diffuse", SIZE)
    again = slide.render_field(500.0, 500.0, "polarized", SIZE)
    fresh = SyntheticSlide("a", "V", seed=3).render_field(500.0, 500.0, "polarized", SIZE)
    np.testing.assert_array_equal(first, again)
    np.testing.assert_array_equal(first, fresh)


def test_illumination_off_is_a_dark_frame() -> None:
    slide = SyntheticSlide("a", "II", seed=5)
    dark = slide.render_field(0.0, 0.0, "off", SIZE)
    lit = slide.render_field(0.0, 0.0, "diffuse", SIZE)
    assert dark.mean() < 5.0
    assert dark.max() < 20
    assert dark.std() > 0.3  # read noise, not a constant black image
    assert lit.mean() > 100.0
    zero_led = slide.render_field(0.0, 0.0, "diffuse", SIZE, led_current=0.0)
    assert zero_led.mean() < 5.0


def test_led_current_and_exposure_scale_the_signal() -> None:
    slide = SyntheticSlide("a", "II", seed=5, config=NO_FAULTS)
    full = slide.render_field(0.0, 0.0, "diffuse", SIZE).mean()
    half = slide.render_field(0.0, 0.0, "diffuse", SIZE, led_current=0.5).mean()
    short = slide.render_field(0.0, 0.0, "diffuse", SIZE, exposure=0.5).mean()
    assert half == pytest.approx(full / 2, rel=0.05)
    assert short == pytest.approx(full / 2, rel=0.05)


def test_diffuse_and_polarized_show_the_same_cells() -> None:
    slide = SyntheticSlide("a", "IV", seed=21, config=NO_FAULTS)
    w, p = slide.render_pair(3000.0, 3000.0, (320, 256))
    far_w = slide.render_field(9000.0, 3000.0, "diffuse", (320, 256))
    assert _corr(w, p) > 0.9
    assert abs(_corr(w, far_w)) < 0.3
    # polarized light is dimmer and red-shifted in chromatin, never identical to diffuse
    assert p.mean() < 0.85 * w.mean()
    shift = cv2.phaseCorrelate(_gray(w), _gray(p))[0]
    assert float(np.hypot(shift[0], shift[1])) < 0.5


def test_misregistered_fields_are_shifted() -> None:
    cfg = SimConfig(
        misregistration_rate=1.0,
        saturated_rate=0,
        dark_rate=0,
        defocus_rate=0,
        misregistration_um=8.0,
    )
    slide = SyntheticSlide("a", "IV", seed=21, config=cfg)
    assert slide.field_fault(3000.0, 3000.0) == "misregistered"
    w, p = slide.render_pair(3000.0, 3000.0, (640, 512))
    shift = cv2.phaseCorrelate(_gray(w), _gray(p))[0]
    assert 3.0 < float(np.hypot(shift[0], shift[1])) < 17.0  # 0.4..1 x 8 µm at 1 µm per pixel


@pytest.mark.parametrize(
    ("knob", "fault"),
    [("saturated_rate", "saturated"), ("dark_rate", "dark"), ("defocus_rate", "defocus")],
)
def test_field_faults(knob: str, fault: str) -> None:
    ok = SyntheticSlide("a", "III", seed=8, config=NO_FAULTS)
    bad = SyntheticSlide("a", "III", seed=8, config=NO_FAULTS.model_copy(update={knob: 1.0}))
    assert ok.field_fault(100.0, 100.0) == "ok"
    assert bad.field_fault(100.0, 100.0) == fault
    good_img = ok.render_field(100.0, 100.0, "diffuse", (320, 256))
    bad_img = bad.render_field(100.0, 100.0, "diffuse", (320, 256))
    checks = {
        "saturated": lambda: (bad_img >= 250).mean() > 0.3 > (good_img >= 250).mean(),
        "dark": lambda: bad_img.mean() < 0.2 * good_img.mean(),
        "defocus": lambda: (
            cv2.Laplacian(_gray(bad_img), cv2.CV_64F).var()
            < 0.5 * cv2.Laplacian(_gray(good_img), cv2.CV_64F).var()
        ),
    }
    assert checks[fault]()


def test_higher_groups_have_more_and_darker_nuclei() -> None:
    # hematoxylin-dark pixels (blue > red, dim) measure nuclear area x hyperchromasia
    frac = {}
    for g in ("II", "V"):
        vals = []
        for s in range(6):
            w = SyntheticSlide("a", g, seed=100 + s, config=NO_FAULTS).render_field(
                0.0, 0.0, "diffuse", (320, 256)
            )
            r, b = w[..., 0].astype(int), w[..., 2].astype(int)
            vals.append(((r + b) < 180).mean())
        frac[g] = float(np.mean(vals))
    assert frac["V"] > 1.5 * frac["II"]


def test_bad_arguments_are_input_errors() -> None:
    slide = SyntheticSlide("a", "II", seed=1)
    with pytest.raises(InputError, match="illumination"):
        slide.render_field(0.0, 0.0, "uv", SIZE)
    with pytest.raises(InputError, match="size"):
        slide.render_field(0.0, 0.0, "diffuse", (0, 10))
    with pytest.raises(InputError, match="led_current"):
        slide.render_field(0.0, 0.0, "diffuse", SIZE, led_current=-1.0)
    with pytest.raises(InputError, match="Pap group"):
        SyntheticSlide("a", "I", seed=1)
    with pytest.raises(ValueError, match="difficulty"):
        SimConfig(difficulty=-1)
    with pytest.raises(ValueError, match="fault rates"):
        SimConfig(saturated_rate=0.6, dark_rate=0.6)
    with pytest.raises(ValueError, match="extra"):
        SimConfig(colour="blue")  # type: ignore[call-arg]


def test_study_proportions() -> None:
    assert scale_counts(441) == STUDY_COUNTS
    for n in (1, 6, 10, 50, 100, 1000):
        counts = scale_counts(n)
        assert sum(counts.values()) == n
        for g in PAP_GROUPS:
            assert abs(counts[g] - n * STUDY_COUNTS[g] / 441) < 1.0
    assert scale_counts(6) == {"II": 2, "III": 1, "IV": 1, "V": 2}
    assert scale_counts(10, {"II": 1, "V": 1}) == {"II": 5, "III": 0, "IV": 0, "V": 5}
    with pytest.raises(InputError):
        scale_counts(0)
    with pytest.raises(InputError, match="Pap group"):
        scale_counts(5, {"VI": 1})


def test_slide_for_is_deterministic_and_follows_the_counts() -> None:
    counts = scale_counts(40)
    groups = [group_for(i, 7, counts) for i in range(40)]
    assert {g: groups.count(g) for g in PAP_GROUPS} == counts
    assert groups != [group_for(i, 8, counts) for i in range(40)]
    a, b = slide_for(3, 7, counts), slide_for(3, 7, counts)
    assert (a.slide_id, a.pap_group, a.seed) == (b.slide_id, b.pap_group, b.seed)
    assert slide_for(4, 7, counts).seed != a.seed
    # beyond the total, further blocks keep the proportions
    more = [group_for(i, 7, counts) for i in range(40, 80)]
    assert {g: more.count(g) for g in PAP_GROUPS} == counts


def test_field_positions_show_different_cells() -> None:
    slide = slide_for(0, 1, config=NO_FAULTS)
    pos = slide.field_positions(3)
    assert len(set(pos)) == 3
    imgs = [slide.render_field(x, y, "diffuse", (320, 256)) for x, y in pos]
    assert abs(_corr(imgs[0], imgs[1])) < 0.3


def _on_a_2um_grid(img: np.ndarray) -> np.ndarray:
    """The central 400x400 µm of a 640 µm wide field, area-averaged to 2 µm pixels."""
    h, w = img.shape[:2]
    grey = cv2.resize(_gray(img), (320, round(h * 320 / w)), interpolation=cv2.INTER_AREA)
    top = round(grey.shape[0] / 2 - 100)
    return np.asarray(grey[top : top + 200, 60:260])


def test_same_field_looks_the_same_at_640x480_and_5_mp() -> None:
    """The sample and the optics are physical: a sensor's pixel count only changes sampling."""
    slide = slide_for(1, 0, config=NO_FAULTS)
    for x in (0.0, 400.0):
        small = _on_a_2um_grid(slide.render_field(x, 0.0, "diffuse", (640, 480)))
        large = _on_a_2um_grid(slide.render_field(x, 0.0, "diffuse", (2448, 2048)))
        other = _on_a_2um_grid(slide.render_field(x + 400.0, 0.0, "diffuse", (640, 480)))
        assert abs(small.mean() - large.mean()) < 0.3  # same illumination, whatever the shape
        assert np.abs(small - large).mean() < 2.5  # sensor noise only
        assert np.abs(small - other).mean() > 10.0
