"""ONNX export, verification against PyTorch, and the model bundle.

Exporter: torch 2.13 defaults to the dynamo-based exporter, which needs ``onnxscript`` (not a
dependency of this project).  The TorchScript-based exporter is still present and is used
here explicitly (``dynamo=False``); it handles VGG16 with a dynamic batch axis at opset 17.

The bundle is built in a temporary directory and renamed into place only when every check has
passed: ``onnx.checker``, ONNX Runtime reproducing PyTorch on the golden inputs (max absolute
difference ≤ 1e-4), :func:`inference.bundle.load_bundle` on the finished directory, and the
device's golden gate over the whole path (golden field pairs -> spectrum -> image -> tensor ->
probabilities, :mod:`inference.golden_path`).  The golden field pairs are simulated fields of
:data:`GOLDEN_FIELD_SLIDES`, small enough to keep the bundle small.
"""

from __future__ import annotations

import io
import json
import logging
import subprocess
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx
import onnxruntime as ort
import torch
from torch import nn

from firmware_bridge.fsutil import atomic_directory, atomic_write_bytes
from inference.backends import load_backend
from inference.bundle import (
    GOLDEN_INPUTS,
    GOLDEN_OUTPUTS,
    MANIFEST,
    MODEL,
    Bundle,
    InputSpec,
    Thresholds,
    Training,
    build_manifest,
    load_bundle,
)
from inference.exceptions import BundleError, InferenceError
from inference.golden_path import check_device_path, write_path_goldens
from training.exceptions import ExportError
from training.model import WithSoftmax

log = logging.getLogger(__name__)

F32 = npt.NDArray[np.float32]
OPSET = 17
GOLDEN_TOLERANCE = 1e-4
INPUT_NAME = "input"
OUTPUT_NAME = "probabilities"
GOLDEN_FIELD_SLIDES = (0, 1, 2)  # simulated slides whose first field is a golden field pair
GOLDEN_FIELD_SIZE = (96, 64)  # width, height of the golden fields


@dataclass(frozen=True)
class BundleMeta:
    """Everything the manifest says besides the files."""

    name: str
    version: int
    task: str
    classes: tuple[str, ...]
    risk: dict[str, str]
    input: InputSpec
    spectrum: dict[str, Any]
    render: dict[str, Any]
    thresholds: Thresholds
    training: Training
    min_app_version: str = "0.1.0"
    qc: dict[str, Any] = field(default_factory=dict)  # QC thresholds of the training data


def code_revision() -> str:
    """Git revision of the training code, ``+dirty`` when modified; ``unknown`` outside git."""
    here = Path(__file__).resolve().parent
    try:
        rev = subprocess.run(
            ["git", "-C", str(here), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(here), "status", "--porcelain", "--", "."],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{rev}+dirty" if dirty else rev or "unknown"


def onnx_bytes(
    model: nn.Module, spec: InputSpec, metadata: dict[str, str], temperature: float = 1.0
) -> bytes:
    """Export ``model`` (logits) with a softmax output as ONNX bytes, with metadata props.

    A ``temperature`` other than 1 divides the logits before the softmax, in the graph.
    """
    wrapped = WithSoftmax(model, temperature).cpu().eval()
    dummy = torch.zeros((2, spec.shape[1], spec.height, spec.width), dtype=torch.float32)
    with tempfile.TemporaryDirectory(prefix="omis-onnx-") as tmp:
        path = Path(tmp) / MODEL
        _torch_export(wrapped, dummy, path)
        proto = onnx.load(str(path))
    for key, value in metadata.items():
        prop = proto.metadata_props.add()
        prop.key, prop.value = key, value
    try:
        onnx.checker.check_model(proto, full_check=True)
    except onnx.checker.ValidationError as exc:
        raise ExportError(f"exported ONNX model fails the checker: {exc}") from exc
    return bytes(proto.SerializeToString())


def _torch_export(model: nn.Module, dummy: torch.Tensor, path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the legacy exporter, on purpose
        torch.onnx.export(
            model,
            (dummy,),
            str(path),
            dynamo=False,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            opset_version=OPSET,
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
            do_constant_folding=True,
        )


def run_onnx(model_bytes: bytes, inputs: F32) -> F32:
    """Probabilities from ONNX Runtime (CPU) for a float32 N×C×H×W batch."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    session = ort.InferenceSession(model_bytes, opts, providers=["CPUExecutionProvider"])
    (out,) = session.run([OUTPUT_NAME], {INPUT_NAME: inputs})
    result: F32 = np.asarray(out, dtype=np.float32)
    return result


@torch.no_grad()
def torch_probabilities(model: nn.Module, inputs: F32, temperature: float = 1.0) -> F32:
    """Probabilities from PyTorch, eval mode, on CPU."""
    wrapped = WithSoftmax(model, temperature).cpu().eval()
    out: F32 = wrapped(torch.from_numpy(inputs)).numpy().astype(np.float32)
    return out


def compare_golden(
    model: nn.Module, model_bytes: bytes, golden: F32, temperature: float = 1.0
) -> tuple[F32, float]:
    """ONNX Runtime outputs on ``golden`` and their max abs difference to PyTorch (≤ 1e-4)."""
    ref = torch_probabilities(model, golden, temperature)
    got = run_onnx(model_bytes, golden)
    diff = float(np.max(np.abs(ref - got)))
    log.info("ONNX Runtime vs PyTorch on %d golden inputs: max abs diff %.3g", len(golden), diff)
    if not diff <= GOLDEN_TOLERANCE:
        raise ExportError(
            f"ONNX Runtime differs from PyTorch by {diff:.3g} (> {GOLDEN_TOLERANCE}) "
            "on the golden inputs"
        )
    return got, diff


def metadata_props(meta: BundleMeta) -> dict[str, str]:
    """ONNX ``metadata_props``: enough to identify the model without its manifest."""
    return {
        "name": meta.name,
        "version": str(meta.version),
        "task": meta.task,
        "classes": json.dumps(list(meta.classes), allow_nan=False),
        "spectrum_algorithm": str(meta.spectrum.get("algorithm", "")),
        "render_version": str(meta.render.get("version", "")),
    }


def _npy_bytes(arr: F32) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(arr, dtype=np.float32), allow_pickle=False)
    return buf.getvalue()


def write_bundle(
    out: Path, model: nn.Module, golden: F32, meta: BundleMeta
) -> tuple[Bundle, float]:
    """Export, verify and write the bundle directory ``out`` (which must not exist yet).

    Returns the verified bundle and the max abs ONNX Runtime vs PyTorch difference.
    """
    if out.exists():
        raise ExportError(f"{out} already exists; choose a new output directory")
    golden = np.ascontiguousarray(golden, dtype=np.float32)
    t = meta.thresholds.temperature
    model_bytes = onnx_bytes(model, meta.input, metadata_props(meta), t)
    outputs, diff = compare_golden(model, model_bytes, golden, t)
    with atomic_directory(out) as tmp:
        (tmp / "golden").mkdir()
        atomic_write_bytes(tmp / MODEL, model_bytes)
        atomic_write_bytes(tmp / GOLDEN_INPUTS, _npy_bytes(golden))
        atomic_write_bytes(tmp / GOLDEN_OUTPUTS, _npy_bytes(outputs))
        n_fields = _write_golden_fields(tmp, model_bytes, meta)
        try:
            manifest = build_manifest(
                tmp,
                name=meta.name,
                version=meta.version,
                task=meta.task,
                classes=meta.classes,
                risk=meta.risk,
                input=meta.input,
                spectrum=meta.spectrum,
                render=meta.render,
                thresholds=meta.thresholds,
                training=meta.training,
                min_app_version=meta.min_app_version,
                qc=meta.qc,
                golden={"fields": n_fields},
            )
        except BundleError as exc:
            raise ExportError(f"bundle manifest: {exc}") from exc
        atomic_write_bytes(tmp / MANIFEST, manifest.to_json_bytes())
        _verify(tmp, golden, outputs)
    log.info("bundle written: %s (%s v%d)", out, meta.name, meta.version)
    return load_bundle(out), diff


def _write_golden_fields(root: Path, model_bytes: bytes, meta: BundleMeta) -> int:
    """Golden field pairs and their reference path outputs (NumPy spectrum, ONNX Runtime)."""
    from inference.selftest import simulated_field

    pairs = [simulated_field(s, 0, GOLDEN_FIELD_SIZE) for s in GOLDEN_FIELD_SLIDES]
    try:
        return write_path_goldens(
            root,
            pairs,
            spectrum=meta.spectrum,
            render=meta.render,
            spec=meta.input,
            infer=lambda x: run_onnx(model_bytes, x),
        )
    except InferenceError as exc:
        raise ExportError(f"golden field pairs: {exc}") from exc


def _verify(root: Path, golden: F32, outputs: F32) -> None:
    """The finished directory must load, and its model must reproduce its golden outputs."""
    try:
        bundle = load_bundle(root)
    except BundleError as exc:
        raise ExportError(f"the written bundle does not verify: {exc}") from exc
    again = run_onnx(bundle.model_path.read_bytes(), golden)
    if not np.array_equal(again, outputs):
        raise ExportError("model.onnx in the bundle does not reproduce golden/outputs.npy")
    try:
        with load_backend("onnxruntime", bundle) as backend:
            check_device_path(backend, bundle, "numpy")
    except InferenceError as exc:
        raise ExportError(f"the written bundle fails the device-path golden gate: {exc}") from exc
