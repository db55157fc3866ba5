"""Fitting one network: weighted loss, seeded and deterministic, early stopping, checkpoints.

Class imbalance: the cross-entropy is weighted by ``n / (K * n_c)`` from the training fold
(the study's groups are uneven: IV is a tenth of the data), so every class carries the same
total weight; the sampler stays uniform.  Early stopping watches the weighted validation loss.

Data parallel: under ``torchrun`` (``WORLD_SIZE`` > 1) the process group is started with
``nccl`` on CUDA and ``gloo`` on CPU, the model is wrapped in ``DistributedDataParallel`` and the
training set is sharded by a seeded ``DistributedSampler``.  Rank 0's decisions (early stop)
are broadcast so that every rank runs the same number of epochs, and only rank 0 writes files.
"""

from __future__ import annotations

import copy
import io
import logging
import os
import random
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import torch
import torch.distributed as dist
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from firmware_bridge.fsutil import atomic_write_bytes
from inference.bundle import InputSpec
from inference.preprocess import model_input
from inference.render import RenderParams
from training.exceptions import ConfigError, DeviceUnavailableError

log = logging.getLogger(__name__)

F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]
ProgressFn = Callable[[str, int, int], None]


class Augment(BaseModel):
    """Spectrum-domain augmentation, applied to ``y`` before rendering (off by default).

    No flips or rotations: they move the peaks, which carry the information.
    """

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, frozen=True)

    noise_std: float = Field(0.0, ge=0.0, le=1.0, description="Gaussian noise, times max|y|")
    scale: float = Field(0.0, ge=0.0, le=0.5, description="intensity scaling by 1 ± U(0, scale)")

    @property
    def enabled(self) -> bool:
        """True when any augmentation is on."""
        return self.noise_std > 0.0 or self.scale > 0.0


class FitConfig(BaseModel):
    """Optimisation settings of one fit (resolved from the preset and the command line)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, frozen=True)

    epochs: int = Field(12, ge=1, description="maximum epochs")
    batch_size: int = Field(8, ge=2, description="per-process batch size")
    lr: float = Field(1e-3, gt=0.0, description="Adam learning rate")
    weight_decay: float = Field(1e-4, ge=0.0, description="Adam weight decay")
    patience: int = Field(4, ge=1, description="epochs without validation improvement")
    seed: int = Field(0, ge=0, description="seed of weights, shuffling and augmentation")
    device: Literal["cpu", "cuda"] = Field("cpu", description="compute device (no fallback)")
    freeze_features: bool = Field(False, description="train only the head")
    augment: Augment = Augment()


@dataclass
class FitResult:
    """The best weights of a fit and its history."""

    state: dict[str, torch.Tensor]
    best_epoch: int
    best_val_loss: float | None
    epochs_run: int
    history: list[dict[str, float | None]] = field(default_factory=list)


# --- determinism and devices -----------------------------------------------------------------


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch, and ask torch for deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed)  # third-party code may draw from the global generator
    torch.manual_seed(seed)
    # cuBLAS needs this for deterministic matmuls; harmless on CPU
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False


def set_threads(threads: int) -> dict[str, Any]:
    """Fix torch's CPU thread count (summation order, hence results, depends on it) and ask for
    deterministic kernels (as :func:`seed_everything` does again before each fit).

    Returns what is now in force, for ``config.json``.
    """
    torch.set_num_threads(threads)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False
    try:
        torch.set_num_interop_threads(1)  # only settable before the first parallel work
    except RuntimeError:
        log.debug("torch inter-op threads already fixed at %d", torch.get_num_interop_threads())
    return {
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        "cudnn_benchmark": bool(torch.backends.cudnn.benchmark),
    }


def resolve_device(name: str) -> torch.device:
    """``cpu`` or ``cuda`` (the local rank's GPU under torchrun); CUDA missing is an error."""
    if name == "cpu":
        return torch.device("cpu")
    if name != "cuda":
        raise ConfigError(f"unknown device {name!r}; use cpu or cuda")
    if not torch.cuda.is_available():
        raise DeviceUnavailableError(
            f"--device cuda: CUDA is not available (torch {torch.__version__}, "
            f"built with CUDA {torch.version.cuda or 'none'})"
        )
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands in a torchrun job (world 1 without torchrun)."""

    rank: int = 0
    world_size: int = 1

    @property
    def active(self) -> bool:
        """True when there is more than one process."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """True on rank 0, the process that writes files."""
        return self.rank == 0


@contextmanager
def distributed(device: str) -> Iterator[DistInfo]:
    """Join the torchrun process group if ``WORLD_SIZE`` > 1; leave it on exit."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or (dist.is_available() and dist.is_initialized()):
        yield DistInfo(dist.get_rank() if world > 1 else 0, world)
        return
    backend = "nccl" if device == "cuda" else "gloo"
    if device == "cuda":
        resolve_device("cuda")
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend)
    log.info("data parallel: rank %d of %d (%s)", dist.get_rank(), world, backend)
    try:
        yield DistInfo(dist.get_rank(), world)
        # Every rank reaches this point before any tears the group down: a rank that leaves
        # first closes its gloo pairs under the other's feet, which aborts that process
        # ("terminate called without an active exception").  Not on an error: a rank that
        # failed must not wait for the others.
        dist.barrier()
    finally:
        dist.destroy_process_group()


def current_dist() -> DistInfo:
    """The process group as now initialised (world 1 when none)."""
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size())
    return DistInfo()


# --- data ---------------------------------------------------------------------------------------


class SpectrumImages(Dataset[tuple[torch.Tensor, int]]):
    """Network inputs and labels; re-renders augmented spectra when augmentation is on."""

    def __init__(
        self,
        inputs: F32,
        labels: I64,
        *,
        spectra: list[tuple[F64, F64]] | None = None,
        render: RenderParams | None = None,
        spec: InputSpec | None = None,
        augment: Augment | None = None,
        seed: int = 0,
    ) -> None:
        self.inputs = torch.from_numpy(np.ascontiguousarray(inputs, dtype=np.float32))
        self.labels = np.asarray(labels, dtype=np.int64)
        self.spectra = spectra
        self.render = render
        self.spec = spec
        self.augment = augment if augment is not None and augment.enabled else None
        self.seed = seed
        self.epoch = 0
        if self.augment is not None and (spectra is None or render is None or spec is None):
            raise ConfigError("augmentation needs spectra (not possible with image datasets)")

    def __len__(self) -> int:
        return int(self.labels.size)

    def set_epoch(self, epoch: int) -> None:
        """Augmentation draws depend on (seed, epoch, index): reproducible and different."""
        self.epoch = epoch

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        label = int(self.labels[i])
        if self.augment is None or self.spectra is None or self.render is None or self.spec is None:
            return self.inputs[i], label
        rng = np.random.default_rng([self.seed, self.epoch, i])
        x_nm, y = self.spectra[i]
        amp = float(np.max(np.abs(y))) or 1.0
        y2 = y * (1.0 + rng.uniform(-self.augment.scale, self.augment.scale))
        y2 = y2 + rng.normal(0.0, self.augment.noise_std * amp, size=y.shape)
        return torch.from_numpy(model_input(x_nm, y2, self.render, self.spec)[0]), label


def class_weights(labels: I64, num_classes: int) -> torch.Tensor:
    """``n / (K * n_c)`` for the classes present; 0 for absent ones (they contribute nothing)."""
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    present = counts > 0
    w = np.zeros(num_classes, dtype=np.float64)
    w[present] = labels.size / (present.sum() * counts[present])
    return torch.tensor(w, dtype=torch.float32)


def _loader(ds: SpectrumImages, batch_size: int, seed: int, info: DistInfo) -> DataLoader[Any]:
    g = torch.Generator()
    g.manual_seed(seed)
    per_rank = -(-len(ds) // info.world_size)
    # batch norm cannot train on a batch of one: drop a last batch of size 1
    drop_last = per_rank % batch_size == 1 and per_rank > 1
    if info.active:
        sampler: DistributedSampler[Any] = DistributedSampler(
            ds, num_replicas=info.world_size, rank=info.rank, shuffle=True, seed=seed
        )
        return DataLoader(ds, batch_size=batch_size, sampler=sampler, drop_last=drop_last)
    return DataLoader(ds, batch_size=batch_size, shuffle=True, generator=g, drop_last=drop_last)


# --- fitting ------------------------------------------------------------------------------------


def _train_epoch(
    model: nn.Module,
    loader: DataLoader[Any],
    *,
    loss_fn: nn.Module,
    opt: torch.optim.Optimizer,
    device: torch.device,
    progress: ProgressFn | None,
) -> float:
    model.train()
    total, n = 0.0, 0
    for step, (xb, yb) in enumerate(loader):
        x, y = xb.to(device), yb.to(device)
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
        total += float(loss.detach()) * x.shape[0]
        n += x.shape[0]
        if progress is not None:
            progress("train", step + 1, len(loader))
    return total / max(n, 1)


@torch.no_grad()
def predict_logits(
    model: nn.Module, inputs: F32, batch_size: int, device: torch.device
) -> torch.Tensor:
    """Logits of ``model`` in eval mode, batch by batch (on CPU)."""
    model.eval()
    x = torch.from_numpy(np.ascontiguousarray(inputs, dtype=np.float32))
    outs = [model(x[i : i + batch_size].to(device)).cpu() for i in range(0, x.shape[0], batch_size)]
    return torch.cat(outs)


def predict_proba(model: nn.Module, inputs: F32, batch_size: int, device: torch.device) -> F64:
    """Softmax probabilities, float64 N×classes."""
    logits = predict_logits(model, inputs, batch_size, device)
    return torch.softmax(logits.double(), dim=1).numpy()


def _sync_buffers(model: nn.Module, info: DistInfo) -> None:
    # batch-norm running statistics drift apart per rank; evaluate everyone with rank 0's
    if info.active:
        for buf in model.buffers():
            dist.broadcast(buf, src=0)


def _broadcast_flag(flag: bool, info: DistInfo, device: torch.device) -> bool:
    if not info.active:
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.int64, device=device)
    dist.broadcast(t, src=0)
    return bool(t.item())


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    """``torch.save`` into memory, then an atomic replace (never a half-written checkpoint)."""
    buf = io.BytesIO()
    torch.save(payload, buf)
    atomic_write_bytes(path, buf.getvalue())


def _state_cpu(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def fit(
    model: nn.Module,
    train: SpectrumImages,
    val_inputs: F32 | None,
    val_labels: I64 | None,
    *,
    cfg: FitConfig,
    num_classes: int,
    checkpoint: Path | None = None,
    checkpoint_extra: dict[str, Any] | None = None,
    progress: ProgressFn | None = None,
) -> FitResult:
    """Train ``model`` in place and return its best state (lowest validation loss).

    Without validation data it trains ``cfg.epochs`` epochs and keeps the last state.
    """
    info = current_dist()
    device = resolve_device(cfg.device)
    model.to(device)
    if cfg.freeze_features:
        for p in model.features.parameters():  # type: ignore[union-attr]
            p.requires_grad_(False)
    net: nn.Module = model
    if info.active:
        net = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    weights = class_weights(train.labels, num_classes).to(device)
    loss_fn = nn.CrossEntropyLoss(weight=weights)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    loader = _loader(train, cfg.batch_size, cfg.seed, info)
    result = FitResult(_state_cpu(model), 0, None, 0)
    stale = 0
    for epoch in range(1, cfg.epochs + 1):
        train.set_epoch(epoch)
        if isinstance(loader.sampler, DistributedSampler):
            loader.sampler.set_epoch(epoch)
        train_loss = _train_epoch(
            net, loader, loss_fn=loss_fn, opt=opt, device=device, progress=progress
        )
        _sync_buffers(model, info)
        val_loss = _val_loss(
            model, val_inputs, val_labels, loss_fn=loss_fn, batch_size=cfg.batch_size, device=device
        )
        result.history.append({"epoch": epoch, "train_loss": train_loss, "val_loss": val_loss})
        result.epochs_run = epoch
        log.debug("epoch %d: train %.4f val %s", epoch, train_loss, val_loss)
        improved = (
            val_loss is None or result.best_val_loss is None or (val_loss < result.best_val_loss)
        )
        if improved:
            result.state, result.best_epoch = _state_cpu(model), epoch
            result.best_val_loss = val_loss
            stale = 0
            if checkpoint is not None and info.is_main:
                save_checkpoint(
                    checkpoint,
                    {
                        **(checkpoint_extra or {}),
                        "model_state": result.state,
                        "epoch": epoch,
                        "val_loss": val_loss,
                    },
                )
        else:
            stale += 1
        if _broadcast_flag(val_loss is not None and stale >= cfg.patience, info, device):
            log.info("early stop after epoch %d (best epoch %d)", epoch, result.best_epoch)
            break
    return result


def _val_loss(
    model: nn.Module,
    inputs: F32 | None,
    labels: I64 | None,
    *,
    loss_fn: nn.Module,
    batch_size: int,
    device: torch.device,
) -> float | None:
    if inputs is None or labels is None or labels.size == 0:
        return None
    logits = predict_logits(model, inputs, batch_size, device)
    target = torch.from_numpy(np.asarray(labels, dtype=np.int64))
    return float(loss_fn(logits.to(device), target.to(device)))


def copy_model(model: nn.Module) -> nn.Module:
    """A deep copy on CPU (for export without disturbing the training model)."""
    return copy.deepcopy(model).cpu()
