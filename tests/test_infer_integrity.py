"""Finite or failed: no value that is NaN, infinite or not a probability ever becomes a label.

Each stage checks what it produces (spectrum, image, input tensor, model output) and raises an
``InvalidValueError`` naming the stage; every JSON the product writes is strict.
"""

from __future__ import annotations

import ast
import json
import math
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fakes.bundles import make_bundle, make_field

from deploy.exceptions import SchemaError
from deploy.ota.store import ModelStore
from deploy.schemas import validate
from firmware_bridge.images import write_png
from inference.backends import load_backend
from inference.bundle import MANIFEST, Bundle, load_bundle
from inference.exceptions import (
    BundleError,
    InvalidValueError,
    NonFiniteError,
    ProbabilityError,
)
from inference.integrity import PROBABILITY_SUM_TOLERANCE, check_finite, check_probabilities
from inference.pipeline import SlidePipeline

ROOT = Path(__file__).resolve().parents[1]
OMIS = [sys.executable, "-m", "deploy.cli"]


def _edit_manifest(root: Path, edit: Callable[[dict[str, Any]], None]) -> Path:
    """Rewrite an (unsigned) bundle's manifest; the manifest is not in its own file list."""
    raw = json.loads((root / MANIFEST).read_bytes())
    edit(raw)
    (root / MANIFEST).write_text(json.dumps(raw, allow_nan=False))
    return root


def _std(value: float) -> Callable[[dict[str, Any]], None]:
    def edit(raw: dict[str, Any]) -> None:
        raw["input"]["normalization"]["std"] = [0.229, value, 0.225]

    return edit


def _fields() -> list[tuple[Any, Any]]:
    return [make_field(0), make_field(1)]


def _run(bundle: Bundle, patch: Callable[[Any], None] | None = None) -> Any:
    with load_backend("onnxruntime", bundle) as backend:
        if patch is not None:
            patch(backend)
        return SlidePipeline(bundle, backend).run_slide(_fields())


def test_zero_std_bundle_gives_no_label_from_omis_infer(tmp_path: Path) -> None:
    bundle = _edit_manifest(make_bundle(tmp_path / "b").root, _std(0.0))
    w, p = make_field(0)
    paths = [write_png(tmp_path / "w.png", w), write_png(tmp_path / "p.png", p)]
    env = {**os.environ, "OMIS_STATE_DIR": str(tmp_path / "state")}
    cmd = [*OMIS, "infer", "-q", "--bundle", str(bundle), *map(str, paths), "--json"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env, check=False)
    assert r.returncode != 0, r.stdout
    assert "label" not in r.stdout and "NaN" not in r.stdout
    assert "input.normalization.std" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_zero_std_is_refused_by_the_manifest(tmp_path: Path) -> None:
    root = _edit_manifest(make_bundle(tmp_path / "b").root, _std(0.0))
    with pytest.raises(BundleError, match=r"input\.normalization\.std\.1: .*greater than 0"):
        load_bundle(root)


def test_overflowing_preprocessing_fails_at_the_preprocess_stage(tmp_path: Path) -> None:
    # A positive but subnormal std passes the manifest and overflows float32 to infinity.
    bundle = load_bundle(_edit_manifest(make_bundle(tmp_path / "b").root, _std(1e-39)))
    with pytest.raises(NonFiniteError) as info:
        _run(bundle)
    assert info.value.stage == "preprocess" and "input tensor" in str(info.value)


@pytest.mark.parametrize(
    ("output", "error"),
    [
        ([np.nan, np.nan], NonFiniteError),
        ([np.inf, 0.0], NonFiniteError),
        ([0.9, 0.9], ProbabilityError),
        ([1.2, -0.2], ProbabilityError),
        ([3.0, -1.0], ProbabilityError),
    ],
)
def test_model_outputs_that_are_not_probabilities_fail_at_infer(
    tmp_path: Path, output: list[float], error: type[InvalidValueError]
) -> None:
    bundle = make_bundle(tmp_path / "b")

    def patch(backend: Any) -> None:
        backend._infer = lambda x: np.tile(np.asarray(output, np.float32), (len(x), 1))

    with pytest.raises(error) as info:
        _run(bundle, patch)
    assert info.value.stage == "infer"


def test_honest_outputs_pass_and_the_result_is_strict_json(tmp_path: Path) -> None:
    result = _run(make_bundle(tmp_path / "b"))
    text = json.dumps(result.to_json(), allow_nan=False)  # raises on NaN or infinity
    assert result.label in ("low", "high") and "NaN" not in text


def test_checks_name_the_stage_and_the_tolerance() -> None:
    check_finite("spectrum", np.arange(5, dtype=np.int64), "hist")  # integers are finite
    with pytest.raises(NonFiniteError, match=r"^spectrum: spectrum values holds 1 .*\(NaN\)"):
        check_finite("spectrum", np.array([0.0, np.nan]), "spectrum values")
    ok = np.array([[0.25, 0.75 + PROBABILITY_SUM_TOLERANCE / 2]], np.float32)
    check_probabilities("infer", ok, 2)
    with pytest.raises(ProbabilityError, match="sum to"):
        check_probabilities("infer", ok + PROBABILITY_SUM_TOLERANCE, 2)
    with pytest.raises(ProbabilityError, match=r"expected N×3"):
        check_probabilities("infer", ok, 3)


def _json_calls_without_strict_flag(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    return [
        f"{path.relative_to(ROOT)}:{node.lineno}"
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr in ("dump", "dumps")
        and isinstance(node.func.value, ast.Name)
        and node.func.value.id == "json"
        and not any(
            k.arg == "allow_nan" and isinstance(k.value, ast.Constant) and k.value.value is False
            for k in node.keywords
        )
    ]


def test_all_json_the_product_writes_is_strict() -> None:
    files = [
        f
        for pkg in ("firmware_bridge", "inference", "training", "deploy", "benchmarks")
        for f in sorted((ROOT / pkg).rglob("*.py"))
    ]
    loose = [hit for f in files for hit in _json_calls_without_strict_flag(f)]
    assert not loose, "json.dump(s) without allow_nan=False:\n" + "\n".join(loose)


def test_schemas_refuse_non_finite_numbers(tmp_path: Path) -> None:
    state = ModelStore(tmp_path).state()
    validate("ota_state", state)
    for bad in (math.nan, math.inf, -math.inf):
        with pytest.raises(SchemaError, match="generation"):
            validate("ota_state", {**state, "generation": bad})
        # Also where the schema does not type the value at all.
        with pytest.raises(SchemaError, match="non-finite"):
            validate("ota_state", {**state, "last_outcome": {"result": "committed", "x": bad}})
