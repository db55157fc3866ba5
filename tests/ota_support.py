"""Tiny signed bundles for the OTA tests, built without torch (onnx.helper + ONNX Runtime).

The model: input "input" N×3×16×16 -> GlobalAveragePool -> Flatten -> Gemm -> Softmax ->
"probabilities" (dynamic batch); its weights depend on ``seed`` so versions differ.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from fakes.bundles import SPECTRUM, write_fields
from onnx import TensorProto, helper

from deploy.ota.signing import generate_keypair, load_private_key, sign_bundle
from firmware_bridge.fsutil import atomic_write_bytes
from inference.bundle import (
    GOLDEN_INPUTS,
    GOLDEN_OUTPUTS,
    MANIFEST,
    MODEL,
    SIGNATURE,
    build_manifest,
    file_entries,
)
from inference.spectrum import parse_params

OMIS = [sys.executable, "-m", "deploy.cli"]
SIZE = 16  # the smallest image the renderer draws
RENDER = {"width": SIZE, "height": SIZE, "margin_px": 2, "line_width": 1}


def tiny_onnx(seed: int) -> bytes:
    """Serialized tiny classifier with seeded weights."""
    rng = np.random.default_rng(seed)
    w = rng.normal(0.0, 2.0, size=(3, 2)).astype(np.float32)
    b = rng.normal(0.0, 0.5, size=(2,)).astype(np.float32)
    nodes = [
        helper.make_node("GlobalAveragePool", ["input"], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["flat"], axis=1),
        helper.make_node("Gemm", ["flat", "W", "B"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, SIZE, SIZE])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", 2])],
        initializer=[
            helper.make_tensor("W", TensorProto.FLOAT, [3, 2], w.ravel().tolist()),
            helper.make_tensor("B", TensorProto.FLOAT, [2], b.tolist()),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def make_bundle(
    root: Path,
    version: int,
    *,
    key: Path | None = None,
    min_app_version: str = "0.1.0",
    bad_golden: bool = False,
    name: str = "tiny",
) -> Path:
    """Write a bundle directory at ``root`` (signed with ``key`` when given); returns it."""
    root.mkdir(parents=True)
    model_bytes = tiny_onnx(seed=version)
    (root / MODEL).write_bytes(model_bytes)
    rng = np.random.default_rng(100 + version)
    inputs = rng.uniform(-1, 1, size=(4, 3, SIZE, SIZE)).astype(np.float32)
    sess = ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
    outputs = np.asarray(sess.run(["probabilities"], {"input": inputs})[0], dtype=np.float32)
    if bad_golden:
        outputs = outputs[:, ::-1].copy()  # the model no longer reproduces its own goldens
    (root / "golden").mkdir()
    np.save(root / GOLDEN_INPUTS, inputs)
    np.save(root / GOLDEN_OUTPUTS, outputs)
    write_fields(root, 2, SIZE, dict(RENDER))
    manifest = build_manifest(
        root,
        name=name,
        version=version,
        task="binary",
        classes=("low", "high"),
        risk={"low": "low", "high": "high"},
        input={"name": "input", "shape": (-1, 3, SIZE, SIZE)},
        spectrum=parse_params(SPECTRUM).model_dump(),
        render=dict(RENDER),
        golden={"fields": 2},
        min_app_version=min_app_version,
    )
    atomic_write_bytes(root / MANIFEST, manifest.to_json_bytes())
    if key is not None:
        sign_bundle(root, key)
    return root


#: ``edit(bundle_root, raw_manifest)``: change files and/or the manifest before re-signing.
Edit = Callable[[Path, dict[str, Any]], None]


def resigned(root: Path, key: Path, edit: Edit) -> Path:
    """Apply ``edit``, re-list every file and sign the exact manifest bytes (even invalid ones:
    the signature covers whatever the manifest says)."""
    raw = json.loads((root / MANIFEST).read_bytes())
    edit(root, raw)
    raw["files"] = {k: v.model_dump() for k, v in file_entries(root).items()}
    data = json.dumps(raw, indent=2).encode()
    (root / MANIFEST).write_bytes(data)
    (root / SIGNATURE).write_bytes(load_private_key(key).sign(data))
    return root


def set_key(path: str, value: Any) -> Edit:
    """An edit setting the manifest key ``a.b.c`` to ``value``."""

    def edit(root: Path, raw: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node = raw
        for p in parents:
            node = node[p]
        node[last] = value

    return edit


def install_cli(state: Path, bundle: Path) -> subprocess.CompletedProcess[str]:
    """``omis ota install -q BUNDLE`` (ONNX Runtime gate) as a real subprocess on ``state``."""
    env = {**os.environ, "OMIS_STATE_DIR": str(state)}
    return subprocess.run(
        [*OMIS, "ota", "install", "-q", str(bundle), "--backend", "onnxruntime"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        check=False,
    )


def make_keys(out_dir: Path, name: str = "signer") -> tuple[Path, Path]:
    """A fresh Ed25519 key pair: (private, public)."""
    pair = generate_keypair(out_dir, name)
    return pair.private, pair.public


def manifest_version(root: Path) -> int:
    """Version in a bundle's manifest."""
    return int(json.loads((root / MANIFEST).read_bytes())["version"])


def tar_with_members(path: Path, members: list[tuple[str, str, bytes]]) -> Path:
    """A hand-made archive of (kind, name, data or link target); kind: file, symlink, …"""
    with tarfile.open(path, "w") as tf:
        for kind, name, data in members:
            info = tarfile.TarInfo(name)
            if kind == "file":
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
                continue
            info.type = {
                "symlink": tarfile.SYMTYPE,
                "hardlink": tarfile.LNKTYPE,
                "fifo": tarfile.FIFOTYPE,
                "dir": tarfile.DIRTYPE,
            }[kind]
            info.linkname = data.decode()
            tf.addfile(info)
    return path


def bundle_members(root: Path) -> list[tuple[str, str, bytes]]:
    """The files of a bundle directory as ``tar_with_members`` entries."""
    return [
        ("file", p.relative_to(root).as_posix(), p.read_bytes())
        for p in sorted(root.rglob("*"))
        if p.is_file()
    ]
