"""Bad input is an error that names the problem, never a guess."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from inference.exceptions import SpectrumInputError
from inference.spectrum import compute_spectrum, open_backend, parse_params, slide_histogram
from inference.spectrum.cpu import numpy_histogram
from inference.spectrum.cuda import prepare_field
from inference.spectrum.reference import reference_histogram

GOOD = np.full((4, 5, 3), 100, np.uint8)
PARAMS = parse_params()


def _numpy(w: Any, p: Any, mask: Any = None) -> object:
    return numpy_histogram(w, p, PARAMS, mask)


def _reference(w: Any, p: Any, mask: Any = None) -> object:
    return reference_histogram(w, p, PARAMS, mask)


def _cuda_host_checks(w: Any, p: Any, mask: Any = None) -> object:
    return prepare_field(w, p, PARAMS, mask)


ENTRY_POINTS = [_numpy, _reference, _cuda_host_checks]

BAD_PAIRS = [
    (GOOD, np.full((4, 6, 3), 100, np.uint8), "differ in shape"),
    (GOOD, np.full((5, 4, 3), 100, np.uint8), "differ in shape"),
    (GOOD.astype(np.uint16), GOOD, "uint8"),
    (GOOD, GOOD.astype(np.float32), "uint8"),
    (GOOD, GOOD.astype(np.int8), "uint8"),
    (GOOD[..., :2], GOOD[..., :2], "H×W×3"),
    (np.full((4, 5, 4), 1, np.uint8), GOOD, "H×W×3"),
    (GOOD[..., 0], GOOD[..., 0], "H×W×3"),
    (np.zeros((0, 5, 3), np.uint8), np.zeros((0, 5, 3), np.uint8), "empty"),
    (np.zeros((4, 0, 3), np.uint8), np.zeros((4, 0, 3), np.uint8), "empty"),
    (GOOD.tolist(), GOOD, "numpy array"),
]


@pytest.mark.parametrize("entry", ENTRY_POINTS, ids=lambda f: f.__name__.strip("_"))
@pytest.mark.parametrize(("w", "p", "words"), BAD_PAIRS)
def test_bad_images_raise(entry: Callable[..., object], w: Any, p: Any, words: str) -> None:
    with pytest.raises(SpectrumInputError, match=words):
        entry(w, p)


BAD_MASKS = [
    (np.zeros((4, 5), np.bool_), "empty"),
    (np.ones((5, 4), np.bool_), "does not match"),
    (np.ones((4, 5, 1), np.bool_), "does not match"),
    (np.ones((4, 5), np.uint8), "boolean"),
    ([[True] * 5] * 4, "boolean"),
]


@pytest.mark.parametrize("entry", ENTRY_POINTS, ids=lambda f: f.__name__.strip("_"))
@pytest.mark.parametrize(("mask", "words"), BAD_MASKS)
def test_bad_masks_raise(entry: Callable[..., object], mask: Any, words: str) -> None:
    with pytest.raises(SpectrumInputError, match=words):
        entry(GOOD, GOOD, mask)


def test_slide_errors_name_the_field() -> None:
    backend = open_backend("numpy")
    fields = [(GOOD, GOOD), (GOOD, GOOD[:, :4])]
    with pytest.raises(SpectrumInputError, match="field 1: W and P differ in shape"):
        slide_histogram(backend, fields, PARAMS)
    with pytest.raises(SpectrumInputError, match="no fields"):
        slide_histogram(backend, [], PARAMS)
    with pytest.raises(SpectrumInputError, match="1 masks for 2 fields"):
        slide_histogram(backend, [(GOOD, GOOD)] * 2, PARAMS, [None])


def test_unknown_backend_is_an_error() -> None:
    with pytest.raises(SpectrumInputError, match="unknown spectrum backend 'opencl'"):
        compute_spectrum([(GOOD, GOOD)], PARAMS, backend="opencl")


@pytest.mark.parametrize(
    ("data", "algorithm", "words"),
    [
        ({"algorithm": "omis-magic-v9"}, None, "unknown spectrum algorithm 'omis-magic-v9'"),
        ({}, "omis-wdiff-v2", "unknown spectrum algorithm"),
        ({"algorithm": "omis-wdiff-v1"}, "omis-rbhist-v1", "conflicts"),
        ({"bins": 290, "colour": "red"}, None, "colour"),
        ({"algorithm": "omis-rbhist-v1", "bins": 300}, None, "bins"),
        ({"bins": 1}, None, "bins"),
        ({"bins": 4001}, None, "bins"),
        ({"bins": "many"}, None, "bins"),
        ({"t_low": -1}, None, "t_low"),
        ({"t_low": 0}, None, "t_low"),  # den = 0 would be possible: the bin is undefined
        ({"t_sat": 0}, None, "t_sat"),
        ({"t_sat": 257}, None, "t_sat"),
        ({"n_smooth": -1}, None, "n_smooth"),
        ({"n_smooth": 31}, None, "n_smooth"),
        ({"lambda_r_nm": 465, "lambda_b_nm": 610}, None, "lambda_r_nm must be greater"),
        ({"lambda_r_nm": 500, "lambda_b_nm": 500}, None, "lambda_r_nm must be greater"),
    ],
)
def test_parse_params_errors(data: dict[str, Any], algorithm: str | None, words: str) -> None:
    with pytest.raises(SpectrumInputError, match=words):
        parse_params(data, algorithm)


def test_parse_params_defaults_and_round_trip() -> None:
    params = parse_params()
    assert params.algorithm == "omis-wdiff-v1"
    assert params.model_dump() == {
        "algorithm": "omis-wdiff-v1",
        "lambda_r_nm": 610.0,
        "lambda_b_nm": 465.0,
        "t_low": 8,
        "t_sat": 250,
        "n_smooth": 8,
        "bins": 290,
    }
    assert parse_params(params.model_dump()) == params
    rb = parse_params(None, "omis-rbhist-v1")
    assert rb.n_bins == 511 and parse_params(rb.model_dump()) == rb
