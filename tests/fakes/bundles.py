"""Tiny model bundles built without torch, for any test that needs a real ``model.onnx``.

The network is conv 3x3 -> ReLU -> global average pool -> gemm -> softmax on an N×3×S×S input
named ``input`` with a dynamic batch axis, output ``probabilities``.  Golden outputs are computed
with ONNX Runtime.  ``logits`` makes a constant-output model (zero gemm weights) whose
probabilities are known exactly, for the decision and abstain-band tests.  ``off_golden`` makes
a model that reproduces its goldens and outputs a fixed row (NaN, non-probabilities, 0.5/0.5)
on every other input: it passes the install gate and misbehaves on real slides, for the tests
of the OTA health period.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from inference.bundle import Bundle, InputSpec, build_manifest, load_bundle
from inference.golden_path import write_path_goldens

SIZE = 32
SPECTRUM = {"algorithm": "omis-wdiff-v1", "bins": 64, "n_smooth": 2}
RENDER = {"width": SIZE, "height": SIZE, "margin_px": 2, "line_width": 1}


def tiny_model(
    n_classes: int = 2,
    size: int = SIZE,
    seed: int = 0,
    logits: Sequence[float] | None = None,
    conv_channels: int = 4,
) -> onnx.ModelProto:
    """The tiny classifier as an ONNX model (opset 17, dynamic batch)."""
    rng = np.random.default_rng(seed)
    c = conv_channels
    conv_w = rng.normal(0, 0.5, (c, 3, 3, 3)).astype(np.float32)
    conv_b = rng.normal(0, 0.1, (c,)).astype(np.float32)
    if logits is None:
        gemm_w = rng.normal(0, 2.0, (n_classes, c)).astype(np.float32)
        gemm_b = np.linspace(-0.5, 0.5, n_classes, dtype=np.float32)
    else:
        gemm_w = np.zeros((n_classes, c), np.float32)
        gemm_b = np.asarray(logits, np.float32)
    inits = [
        numpy_helper.from_array(conv_w, "conv_w"),
        numpy_helper.from_array(conv_b, "conv_b"),
        numpy_helper.from_array(gemm_w, "gemm_w"),
        numpy_helper.from_array(gemm_b, "gemm_b"),
    ]
    nodes = [
        helper.make_node("Conv", ["input", "conv_w", "conv_b"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("GlobalAveragePool", ["r1"], ["g1"]),
        helper.make_node("Flatten", ["g1"], ["f1"], axis=1),
        helper.make_node("Gemm", ["f1", "gemm_w", "gemm_b"], ["logits"], transB=1),
        helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
    ]
    graph = helper.make_graph(
        nodes,
        "omis-tiny",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, size, size])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", n_classes])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def golden_only_model(
    model: onnx.ModelProto, known: Any, off_golden: Sequence[float], eps: float = 1e-3
) -> onnx.ModelProto:
    """``model`` on inputs within ``eps`` (squared L2) of one of the ``known`` tensors, the
    constant ``off_golden`` row (NaN, non-probabilities, an uncertain 0.5/0.5, …) on any other.

    Its outputs depend on the input in a way no golden exercises: the gate passes, slides fail.
    """
    graph = onnx.GraphProto()
    graph.CopyFrom(model.graph)
    probs = graph.output[0].name
    for node in graph.node:
        node.output[:] = [f"{o}_model" if o == probs else o for o in node.output]
    graph.initializer.extend(
        [
            numpy_helper.from_array(np.asarray(known, np.float32), "known_inputs"),
            numpy_helper.from_array(np.asarray([1], np.int64), "unsqueeze_axis"),
            numpy_helper.from_array(np.asarray([eps], np.float32), "known_eps"),
            numpy_helper.from_array(np.asarray([off_golden], np.float32), "off_golden"),
        ]
    )
    graph.node.extend(
        [
            helper.make_node("Unsqueeze", ["input", "unsqueeze_axis"], ["x_1"]),
            helper.make_node("Sub", ["x_1", "known_inputs"], ["x_diff"]),
            helper.make_node("ReduceSumSquare", ["x_diff"], ["x_d2"], axes=[2, 3, 4], keepdims=0),
            helper.make_node("ReduceMin", ["x_d2"], ["x_nearest"], axes=[1], keepdims=1),
            helper.make_node("Less", ["x_nearest", "known_eps"], ["x_known"]),
            helper.make_node("Where", ["x_known", f"{probs}_model", "off_golden"], [probs]),
        ]
    )
    out = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    out.ir_version = 8
    onnx.checker.check_model(out)
    return out


def golden_for(model_path: Path, n: int = 4, size: int = SIZE, seed: int = 1) -> tuple[Any, Any]:
    """Golden inputs (seeded normal noise) and ONNX Runtime's outputs for them."""
    x = np.random.default_rng(seed).normal(0, 1, (n, 3, size, size)).astype(np.float32)
    sess = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    (y,) = sess.run(["probabilities"], {"input": x})
    return x, np.asarray(y, np.float32)


def make_bundle(
    root: Path,
    *,
    classes: Sequence[str] = ("low", "high"),
    risk: dict[str, str] | None = None,
    seed: int = 0,
    logits: Sequence[float] | None = None,
    golden_n: int = 4,
    allow_fp32_fallback: bool = True,
    tolerance: dict[str, float] | None = None,
    thresholds: dict[str, float] | None = None,
    render: dict[str, Any] | None = None,
    qc: dict[str, Any] | None = None,
    name: str = "tiny",
    version: int = 1,
    golden_offset: float = 0.0,
    swap_golden_classes: bool = False,
    golden_fields: int = 2,
    off_golden: Sequence[float] | None = None,
    training: dict[str, Any] | None = None,
) -> Bundle:
    """Write a complete, valid bundle directory at ``root`` and load it.

    ``golden_fields`` field pairs (from :func:`make_field`) carry the whole-path goldens.
    ``off_golden``: the model reproduces its goldens but outputs these values for every other
    input (see :func:`golden_only_model`): it passes the gate and misbehaves on real slides.
    """
    root.mkdir(parents=True, exist_ok=True)
    (root / "golden").mkdir(exist_ok=True)
    model = tiny_model(len(classes), seed=seed, logits=logits)
    onnx.save(model, str(root / "model.onnx"))
    x, y = golden_for(root / "model.onnx", n=golden_n)
    # Deliberately wrong golden outputs, for the tests of the gate itself.
    y = y + np.float32(golden_offset)
    if swap_golden_classes:
        y = np.ascontiguousarray(y[:, ::-1])
    np.save(root / "golden" / "inputs.npy", x)
    np.save(root / "golden" / "outputs.npy", y)
    render = {**RENDER, **(render or {})}
    write_fields(root, golden_fields, SIZE, render)
    if off_golden is not None:
        # What the gate runs: the tensor goldens, the warm-up's zeros, the path goldens.
        known = [np.load(root / "golden" / "inputs.npy"), np.zeros((1, 3, SIZE, SIZE), np.float32)]
        if golden_fields:
            known.append(np.load(root / "golden" / "path" / "inputs.npy"))
        onnx.save(golden_only_model(model, np.concatenate(known), off_golden), root / "model.onnx")
    risk = risk or {c: ("high" if i == len(classes) - 1 else "low") for i, c in enumerate(classes)}
    golden: dict[str, Any] = {"allow_fp32_fallback": allow_fp32_fallback, "fields": golden_fields}
    if tolerance is not None:
        golden["tolerance"] = tolerance
    fields: dict[str, Any] = {
        "name": name,
        "version": version,
        "task": "binary" if len(classes) == 2 else "pap4",
        "classes": tuple(classes),
        "risk": risk,
        "input": {"name": "input", "shape": (-1, 3, SIZE, SIZE)},
        "output": {"name": "probabilities"},
        "spectrum": dict(SPECTRUM),
        "render": render,
        "golden": golden,
    }
    if thresholds is not None:
        fields["thresholds"] = thresholds
    if qc is not None:
        fields["qc"] = qc
    if training is not None:
        fields["training"] = training
    manifest = build_manifest(root, **fields)
    (root / "manifest.json").write_bytes(manifest.to_json_bytes())
    return load_bundle(root)


def write_fields(root: Path, n: int, size: int, render: dict[str, Any] | None = None) -> None:
    """Whole-path goldens for ``n`` field pairs, with ``root/model.onnx`` as the model."""
    if n == 0:
        return
    sess = ort.InferenceSession(str(root / "model.onnx"), providers=["CPUExecutionProvider"])

    def infer(x: Any) -> Any:
        return sess.run(["probabilities"], {"input": x})[0]

    pairs = [make_field(100 + i) for i in range(n)]
    spec = InputSpec(shape=(-1, 3, size, size))
    write_path_goldens(
        root, pairs, spectrum=dict(SPECTRUM), render=render or dict(RENDER), spec=spec, infer=infer
    )


def make_field(seed: int, size: tuple[int, int] = (48, 48)) -> tuple[Any, Any]:
    """A W/P pair that passes quality control: textured, in range, P registered to W."""
    h, w = size
    rng = np.random.default_rng(seed)
    base = rng.integers(40, 200, (h, w, 3), dtype=np.int32)
    # Smooth a little so the focus measure is realistic, keep texture for registration.
    base = (base + np.roll(base, 1, axis=0) + np.roll(base, 1, axis=1)) // 3
    tint = np.array([1.0, 0.95, 0.85]) + rng.normal(0, 0.02, 3)
    p = np.clip(base * tint, 0, 240).astype(np.uint8)
    return base.astype(np.uint8), p
