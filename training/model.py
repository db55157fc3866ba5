"""VGG16 (configuration D) with the study's classification head, and the training presets.

The convolutional base is an ``nn.Sequential`` called ``features`` with exactly torchvision's
indices (``features.0`` … ``features.28``), so torchvision's ImageNet ``vgg16`` state dict loads
into it unchanged.  The head is the study's: Dense 256 + ReLU, dropout, batch norm, Dense 4096 +
ReLU, batch norm, Dense(classes).  The network returns logits (training uses cross-entropy);
:class:`WithSoftmax` adds the softmax for export, so the ONNX graph outputs probabilities.
"""

from __future__ import annotations

import logging
import pickle
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from training.exceptions import ConfigError

log = logging.getLogger(__name__)

# Configuration D of Simonyan & Zisserman: channel widths, "M" for a 2x2 max pool.
VGG16_D: tuple[int | str, ...] = (
    64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M",
)  # fmt: skip
N_POOLS = 5


@dataclass(frozen=True)
class Preset:
    """Network size and training defaults; ``tiny`` keeps the topology with fewer channels."""

    name: str
    input_size: tuple[int, int]  # (height, width) of the spectrum image
    width_divisor: int  # conv channel widths are VGG16's divided by this
    head: tuple[int, int]  # widths of the two hidden dense layers
    dropout: float
    batch_size: int
    epochs: int
    lr: float
    patience: int
    kind: str = "vgg16"  # "vgg16" (reads the image) or "spectrum1d" (reads the spectrum vector)

    @property
    def representation(self) -> str:
        """What the network reads: ``image`` or ``spectrum`` (the manifest's input says so)."""
        return "spectrum" if self.kind == "spectrum1d" else "image"

    def to_json(self) -> dict[str, Any]:
        """JSON object for config.json and checkpoints."""
        return asdict(self)


PRESETS: dict[str, Preset] = {
    "paper": Preset("paper", (224, 224), 1, (256, 4096), 0.5, 16, 30, 1e-4, 5),
    # tiny: a plain 13-conv stack from scratch on ~100 slides needs a small learning rate and a
    # long, patient schedule; its validation loss plateaus for ~10 epochs before it drops.
    "tiny": Preset("tiny", (64, 64), 16, (16, 256), 0.3, 16, 40, 3e-4, 12),
    # spectrum1d: input_size (1, L) is resolved from the spectrum algorithm at run time;
    # "head" is (conv width of the last block, hidden dense width).
    "spectrum1d": Preset(
        "spectrum1d", (1, 0), 1, (32, 32), 0.3, 16, 60, 1e-3, 12, kind="spectrum1d"
    ),
}


def get_preset(name: str) -> Preset:
    """The preset called ``name``."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}") from None


def make_features(width_divisor: int = 1) -> nn.Sequential:
    """VGG16-D convolutional base in torchvision's layout (Conv, ReLU, …, MaxPool)."""
    layers: list[nn.Module] = []
    in_ch = 3
    for item in VGG16_D:
        if item == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            continue
        out_ch = max(1, int(item) // width_divisor)
        layers += [nn.Conv2d(in_ch, out_ch, kernel_size=3, padding=1), nn.ReLU(inplace=True)]
        in_ch = out_ch
    return nn.Sequential(*layers)


def _feature_shape(width_divisor: int, input_size: tuple[int, int]) -> tuple[int, int, int]:
    h, w = input_size
    for _ in range(N_POOLS):
        h, w = h // 2, w // 2
    if h < 1 or w < 1:
        raise ConfigError(f"input size {input_size} is too small for 5 pooling stages (min 32)")
    return max(1, 512 // width_divisor), h, w


class VGG16Classifier(nn.Module):
    """VGG16-D base + the study's head; ``forward`` returns logits."""

    def __init__(
        self,
        num_classes: int,
        *,
        width_divisor: int = 1,
        head: tuple[int, int] = (256, 4096),
        dropout: float = 0.5,
        input_size: tuple[int, int] = (224, 224),
    ) -> None:
        super().__init__()
        if num_classes < 2:
            raise ConfigError(f"need at least 2 classes, got {num_classes}")
        c, h, w = _feature_shape(width_divisor, input_size)
        h1, h2 = head
        self.features = make_features(width_divisor)
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.Linear(c * h * w, h1),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.BatchNorm1d(h1),
            nn.Linear(h1, h2),
            nn.ReLU(inplace=True),
            nn.BatchNorm1d(h2),
            nn.Linear(h2, num_classes),
        )
        self._initialize_weights()

    def _initialize_weights(self) -> None:
        # torchvision's VGG initialisation: a 13-layer plain conv stack without batch norm
        # trains from scratch only with He initialisation (PyTorch's default init lets the
        # signal fade through the depth, and the tiny preset then stays at chance).
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm1d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of shape N×classes."""
        out: torch.Tensor = self.head(self.features(x))
        return out


class WithSoftmax(nn.Module):
    """Wraps a logits model so that it outputs probabilities (the exported graph)."""

    def __init__(self, model: nn.Module, temperature: float = 1.0) -> None:
        super().__init__()
        self.model = model
        self.temperature = float(temperature)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Softmax probabilities of shape N×classes (logits divided by the temperature)."""
        logits = self.model(x)
        if self.temperature != 1.0:
            logits = logits / self.temperature
        return torch.softmax(logits, dim=1)


class Spectrum1DClassifier(nn.Module):
    """A small 1-D CNN on the full spectrum vector (input N×1×1×L); ``forward`` returns logits.

    Three blocks of Conv (1×5) -> BatchNorm -> ReLU -> MaxPool (1×2), then Flatten -> Dropout
    -> Dense + ReLU -> Dense(classes).  The 1-D convolutions are 2-D convolutions with 1×k
    kernels on a 1-pixel-high input, so the ONNX graph holds only Conv, BatchNormalization,
    Relu, MaxPool, Flatten, Gemm and Softmax: layers TensorRT supports natively.  Flatten
    keeps where a feature sits on the axis (the peak positions carry the signal).
    """

    def __init__(
        self, num_classes: int, length: int, *, widths: tuple[int, ...] = (8, 16, 32),
        hidden: int = 32, dropout: float = 0.3,
    ) -> None:  # fmt: skip
        super().__init__()
        if num_classes < 2:
            raise ConfigError(f"need at least 2 classes, got {num_classes}")
        if length >> len(widths) < 1:
            raise ConfigError(f"spectrum of {length} points is too short for {len(widths)} pools")
        layers: list[nn.Module] = []
        in_ch, n = 1, length
        for w in widths:
            layers += [
                nn.Conv2d(in_ch, w, kernel_size=(1, 5), padding=(0, 2)),
                nn.BatchNorm2d(w),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(kernel_size=(1, 2), stride=(1, 2)),
            ]
            in_ch, n = w, n // 2
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.Dropout(dropout),
            nn.Linear(in_ch * n, hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of shape N×classes."""
        out: torch.Tensor = self.head(self.features(x))
        return out


def build_model(preset: Preset, num_classes: int) -> nn.Module:
    """A fresh network for ``preset`` (spectrum1d: ``input_size`` must be resolved to (1, L))."""
    if preset.kind == "spectrum1d":
        width, hidden = preset.head
        return Spectrum1DClassifier(
            num_classes,
            preset.input_size[1],
            widths=(width // 4, width // 2, width),
            hidden=hidden,
            dropout=preset.dropout,
        )
    return VGG16Classifier(
        num_classes,
        width_divisor=preset.width_divisor,
        head=preset.head,
        dropout=preset.dropout,
        input_size=preset.input_size,
    )


def load_pretrained(model: VGG16Classifier, path: str | Path) -> None:
    """Load torchvision-layout VGG16 weights (a state dict ``.pth``) into the convolutional base.

    ``features.*`` keys must match the base exactly (names and shapes); torchvision's
    ``classifier.*`` keys are ignored (the head is the study's, trained from scratch).
    """
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--pretrained {p}: no such file")
    try:
        state = torch.load(p, map_location="cpu", weights_only=True)
    except (
        OSError,
        RuntimeError,
        ValueError,
        LookupError,
        EOFError,
        pickle.UnpicklingError,
    ) as exc:
        # torch.load reports a non-checkpoint in many ways (a text file: KeyError, IndexError)
        raise ConfigError(f"--pretrained {p}: not a readable state dict ({exc})") from exc
    if not isinstance(state, dict):
        raise ConfigError(f"--pretrained {p}: expected a state dict, got {type(state).__name__}")
    load_features_state(model, state, str(p))


def load_features_state(model: VGG16Classifier, state: dict[str, Any], source: str) -> None:
    """Copy ``features.*`` tensors of a torchvision-layout state dict into ``model``."""
    ignored = sorted(k for k in state if k.startswith("classifier."))
    if ignored:
        log.info(
            "%s: ignoring %d torchvision classifier.* keys (head is trained anew)",
            source,
            len(ignored),
        )
    feats = {k[len("features.") :]: v for k, v in state.items() if k.startswith("features.")}
    stray = sorted(k for k in state if not k.startswith(("features.", "classifier.")))
    own = model.features.state_dict()
    missing = sorted(f"features.{k}" for k in own if k not in feats)
    unexpected = sorted(f"features.{k}" for k in feats if k not in own) + stray
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing key(s) {', '.join(missing)}")
        if unexpected:
            parts.append(f"unexpected key(s) {', '.join(unexpected)}")
        raise ConfigError(f"{source}: {'; '.join(parts)}")
    for k, v in feats.items():
        if not isinstance(v, torch.Tensor) or tuple(v.shape) != tuple(own[k].shape):
            got = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
            raise ConfigError(
                f"{source}: features.{k} has shape {got}, this preset needs "
                f"{tuple(own[k].shape)} (pretrained ImageNet weights fit the paper preset only)"
            )
    model.features.load_state_dict(feats, strict=True)
    log.info("%s: loaded %d pretrained tensors into the convolutional base", source, len(feats))
