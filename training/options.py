"""The options of ``omis train`` and the checks made before any work starts."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from firmware_bridge.limits import MAX_EPOCHS, MAX_FOLDS
from inference.bundle import Pretrained
from inference.exceptions import InferenceError
from inference.render import RenderParams, render_params_from_json
from training.data import sha256_path
from training.exceptions import ConfigError
from training.model import Preset
from training.train import Augment, FitConfig


class TrainOptions(BaseModel):
    """Everything ``omis train`` accepts; ``None`` takes the preset's value."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, frozen=True)

    data: Path = Field(description="dataset directory with manifest.csv")
    out: Path = Field(description="output directory (must not exist, or be empty)")
    task: Literal["binary", "pap4", "ii-v"] = "binary"
    preset: Literal["paper", "tiny", "spectrum1d"] = "tiny"
    folds: int = Field(5, ge=2, le=MAX_FOLDS)
    epochs: int | None = Field(None, ge=1, le=MAX_EPOCHS)
    batch_size: int | None = Field(None, ge=2)
    lr: float | None = Field(None, gt=0.0)
    device: Literal["cpu", "cuda"] = "cpu"
    pretrained: Path | None = None
    from_scratch: bool = Field(False, description="paper preset: train from random weights")
    freeze_features: bool = False
    seed: int = Field(0, ge=0)
    name: str = Field("omis-vgg16", pattern=r"^[A-Za-z0-9._-]+$")
    version: int = Field(1, ge=1)
    max_slides: int | None = Field(None, ge=1)
    final: Literal["all", "best-fold"] = "all"
    target_sensitivity: float = Field(0.9, gt=0.0, le=1.0)
    max_referral: float = Field(
        0.2, ge=0.0, le=1.0, description="largest share of slides the abstain band may refer"
    )
    referral_confidence: float = Field(
        0.95,
        ge=0.5,
        lt=1.0,
        description="probability with which the referral rate on new slides stays within "
        "max_referral",
    )
    threads: int = Field(
        1, ge=1, le=256, description="torch intra-op threads (results depend on the count)"
    )
    temperature_scaling: bool = Field(False, description="fit a softmax temperature")
    out_of_range: float | None = Field(
        0.05, ge=0.0, le=1.0, description="bundle threshold on mass outside the render window"
    )
    spectrum_params: dict[str, Any] | None = None
    render_params: dict[str, Any] | None = Field(
        None, description="image datasets: the render parameters the images were drawn with"
    )
    allow_lossy: bool = Field(False, description="accept JPEG field images")
    cache_dir: Path | None = Field(None, description="default: DATA/.omis-cache")
    no_cache: bool = False
    augment: Augment = Augment()
    group_by: Literal["patient", "device", "site"] = Field(
        "patient", description="cross-validation groups: patient (K folds) or leave-one-out"
    )


def fit_config(opts: TrainOptions, preset: Preset) -> FitConfig:
    """Preset defaults overridden by the options."""
    return FitConfig(
        epochs=opts.epochs or preset.epochs,
        batch_size=opts.batch_size or preset.batch_size,
        lr=opts.lr or preset.lr,
        patience=preset.patience,
        seed=opts.seed,
        device=opts.device,
        freeze_features=opts.freeze_features,
        augment=opts.augment,
    )


def check_weights_decision(opts: TrainOptions) -> None:
    """The paper preset needs ``--pretrained PATH`` or ``--from-scratch``; others neither."""
    if opts.pretrained is not None and opts.from_scratch:
        raise ConfigError("--pretrained and --from-scratch exclude each other")
    if opts.preset == "paper" and opts.pretrained is None and not opts.from_scratch:
        raise ConfigError(
            "--preset paper needs a weights decision: --pretrained PATH (torchvision's ImageNet "
            "VGG16 state dict) or --from-scratch"
        )
    if opts.preset != "paper" and opts.pretrained is not None:
        raise ConfigError(f"--pretrained fits the paper preset only, not {opts.preset}")


def pretrained_record(opts: TrainOptions) -> Pretrained | None:
    """``{source, sha256}`` of the initial weights, None when trained from scratch."""
    if opts.pretrained is None:
        return None
    if not opts.pretrained.is_file():
        raise ConfigError(f"--pretrained {opts.pretrained}: no such file")
    return Pretrained(source=opts.pretrained.name, sha256=sha256_path(opts.pretrained))


def given_render(opts: TrainOptions, preset: Preset) -> RenderParams:
    """The render parameters an image dataset was drawn with (``--render-params``)."""
    if opts.render_params is None:
        raise ConfigError(
            "image dataset: --render-params JSON|@FILE is required (the parameters the images "
            "were drawn with; the bundle records them and the device draws with them)"
        )
    try:
        render = render_params_from_json(opts.render_params)
    except InferenceError as exc:
        raise ConfigError(f"--render-params: {exc}") from exc
    if preset.representation == "image" and (render.height, render.width) != preset.input_size:
        raise ConfigError(
            f"--render-params: {render.width}x{render.height} images, the {preset.name} preset "
            f"reads {preset.input_size[1]}x{preset.input_size[0]}"
        )
    return render
