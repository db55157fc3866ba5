"""VGG16-D layout: torchvision's state dict keys load into the base; the tiny preset's shape."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from training.exceptions import ConfigError
from training.model import PRESETS, VGG16Classifier, build_model, load_pretrained

# torchvision.models.vgg16: conv layers at these indices of ``features`` (ReLU and MaxPool
# in between), with (out, in) channels of configuration D; classifier 25088-4096-4096-1000.
TV_CONV = {
    0: (64, 3), 2: (64, 64), 5: (128, 64), 7: (128, 128), 10: (256, 128), 12: (256, 256),
    14: (256, 256), 17: (512, 256), 19: (512, 512), 21: (512, 512), 24: (512, 512),
    26: (512, 512), 28: (512, 512),
}  # fmt: skip
TV_CLASSIFIER = {0: (4096, 25088), 3: (4096, 4096), 6: (1000, 4096)}


def torchvision_vgg16_state() -> dict[str, torch.Tensor]:
    """A state dict in torchvision's exact key layout and shapes (random values)."""
    g = torch.Generator().manual_seed(0)
    state: dict[str, torch.Tensor] = {}
    for i, (o, c) in TV_CONV.items():
        state[f"features.{i}.weight"] = torch.randn(o, c, 3, 3, generator=g)
        state[f"features.{i}.bias"] = torch.randn(o, generator=g)
    for i, (o, c) in TV_CLASSIFIER.items():
        # exact shapes on a one-element storage: 400 MB of zeros would only slow the test
        state[f"classifier.{i}.weight"] = torch.zeros(1).expand(o, c)
        state[f"classifier.{i}.bias"] = torch.zeros(1).expand(o)
    return state


@pytest.fixture(scope="module")
def tv_state_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tv") / "vgg16.pth"
    torch.save(torchvision_vgg16_state(), path)
    return path


@pytest.fixture(scope="module")
def paper_model() -> VGG16Classifier:
    return build_model(PRESETS["paper"], 2)


def test_paper_base_has_torchvision_keys(paper_model: VGG16Classifier) -> None:
    model = paper_model
    own = {k: tuple(v.shape) for k, v in model.features.state_dict().items()}
    want: dict[str, tuple[int, ...]] = {}
    for i, (o, c) in TV_CONV.items():
        want[f"{i}.weight"] = (o, c, 3, 3)
        want[f"{i}.bias"] = (o,)
    assert own == want


def test_load_torchvision_state_dict(
    tv_state_file: Path, paper_model: VGG16Classifier, caplog: pytest.LogCaptureFixture
) -> None:
    state = torch.load(tv_state_file, weights_only=True)
    model = paper_model
    with caplog.at_level("INFO"):
        load_pretrained(model, tv_state_file)
    assert "ignoring 6 torchvision classifier" in caplog.text
    loaded = model.features.state_dict()
    for i in TV_CONV:
        assert torch.equal(loaded[f"{i}.weight"], state[f"features.{i}.weight"])
        assert torch.equal(loaded[f"{i}.bias"], state[f"features.{i}.bias"])


def test_missing_and_unexpected_keys_are_named(
    tmp_path: Path, paper_model: VGG16Classifier
) -> None:
    state = torchvision_vgg16_state()
    del state["features.28.bias"]
    state["features.30.weight"] = torch.zeros(1)
    path = tmp_path / "bad.pth"
    torch.save(state, path)
    with pytest.raises(
        ConfigError,
        match=r"missing key\(s\) features\.28\.bias.*unexpected key"
        r"\(s\) features\.30\.weight",
    ):
        load_pretrained(paper_model, path)


def test_pretrained_shape_mismatch_for_tiny(tv_state_file: Path) -> None:
    with pytest.raises(ConfigError, match=r"features\.0\.weight has shape"):
        load_pretrained(build_model(PRESETS["tiny"], 2), tv_state_file)


def test_tiny_topology_and_output() -> None:
    model = build_model(PRESETS["tiny"], 4).eval()
    convs = [m for m in model.features if isinstance(m, torch.nn.Conv2d)]
    pools = [m for m in model.features if isinstance(m, torch.nn.MaxPool2d)]
    assert len(convs) == 13 and len(pools) == 5
    kinds = [type(m).__name__ for m in model.head]
    assert kinds == [
        "Flatten",
        "Linear",
        "ReLU",
        "Dropout",
        "BatchNorm1d",
        "Linear",
        "ReLU",
        "BatchNorm1d",
        "Linear",
    ]
    h, w = PRESETS["tiny"].input_size
    out = model(torch.zeros(3, 3, h, w))
    assert out.shape == (3, 4)


@pytest.mark.gpu
def test_fit_on_cuda() -> None:
    """The same tiny fit on the GPU: finite losses, weights on the device, no fallback."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU here")
    import numpy as np

    from training.train import FitConfig, SpectrumImages, fit

    h, w = PRESETS["tiny"].input_size
    x = np.random.default_rng(0).normal(size=(8, 3, h, w)).astype(np.float32)
    y = np.array([0, 1] * 4, dtype=np.int64)
    model = build_model(PRESETS["tiny"], 2)
    cfg = FitConfig(epochs=2, batch_size=4, device="cuda")
    res = fit(model, SpectrumImages(x, y), x, y, cfg=cfg, num_classes=2)
    assert next(model.parameters()).is_cuda
    assert all(np.isfinite(h_["train_loss"] or 0.0) for h_ in res.history)
