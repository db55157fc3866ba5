"""Training checkpoints (``omis.checkpoint/1``) and re-exporting them as bundles.

A checkpoint is self-contained: besides the weights it holds the preset, the bundle metadata
(task, classes, spectrum and render parameters, input spec, metrics) and the golden inputs, so
``omis export`` rebuilds exactly the bundle the training run would have written.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from inference.bundle import Bundle, InputSpec, Thresholds, Training
from training.exceptions import ExportError
from training.export import BundleMeta, write_bundle
from training.model import Preset, build_model

FORMAT = "omis.checkpoint/1"


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint (weights-only unpickling: no code runs from the file)."""
    p = Path(path)
    if not p.is_file():
        raise ExportError(f"{p}: no such checkpoint")
    try:
        data = torch.load(p, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, ValueError) as exc:
        raise ExportError(f"{p}: not a readable checkpoint ({exc})") from exc
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ExportError(f"{p}: not an {FORMAT} checkpoint")
    return data


def meta_from_json(d: dict[str, Any], **overrides: Any) -> BundleMeta:
    """Bundle metadata from its checkpoint form."""
    fields = {**d, **{k: v for k, v in overrides.items() if v is not None}}
    return BundleMeta(
        name=fields["name"],
        version=int(fields["version"]),
        task=fields["task"],
        classes=tuple(fields["classes"]),
        risk=dict(fields["risk"]),
        input=InputSpec.model_validate(fields["input"]),
        spectrum=dict(fields["spectrum"]),
        render=dict(fields["render"]),
        thresholds=Thresholds.model_validate(fields["thresholds"]),
        training=Training.model_validate(fields["training"]),
        min_app_version=fields["min_app_version"],
        qc=dict(fields.get("qc", {})),
    )


def export_checkpoint(
    path: str | Path, out: str | Path, *, name: str | None = None, version: int | None = None
) -> tuple[Bundle, float]:
    """Rebuild the network from a checkpoint and write a verified bundle to ``out``."""
    data = load_checkpoint(path)
    preset_d = dict(data["preset"])
    preset_d["input_size"] = tuple(preset_d["input_size"])
    preset_d["head"] = tuple(preset_d["head"])
    model = build_model(Preset(**preset_d), int(data["num_classes"]))
    try:
        model.load_state_dict(data["model_state"])
    except RuntimeError as exc:
        raise ExportError(f"{path}: weights do not fit the recorded preset ({exc})") from exc
    meta = meta_from_json(data["bundle_meta"], name=name, version=version)
    golden = np.ascontiguousarray(data["golden_inputs"].numpy(), dtype=np.float32)
    return write_bundle(Path(out), model, golden, meta)
