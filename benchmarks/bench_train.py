"""Training throughput (forward + backward + Adam step, images/s) of the presets on this CPU.

    .venv/bin/python benchmarks/bench_train.py [--batches N] [--presets tiny,paper]

Random inputs of each preset's size; the first batch is a warm-up and is not timed.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from training.model import PRESETS, build_model

PAPER_BATCH = 4


def bench(preset_name: str, batches: int, batch_size: int) -> tuple[float, float]:
    """(images/s, seconds per batch) for ``batches`` timed training steps."""
    preset = PRESETS[preset_name]
    torch.manual_seed(0)
    model = build_model(preset, 2).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    loss_fn = nn.CrossEntropyLoss()
    h, w = preset.input_size
    x = torch.randn(batch_size, 3, h, w)
    y = torch.arange(batch_size) % 2

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        opt.step()

    step()  # warm-up
    t0 = time.perf_counter()
    for _ in range(batches):
        step()
    dt = time.perf_counter() - t0
    return batches * batch_size / dt, dt / batches


def main() -> None:
    """Print the table."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--batches", type=int, default=5, help="timed batches per preset")
    ap.add_argument("--presets", default="tiny,paper")
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'preset':<8} {'input':<9} {'batch':>5} {'batches':>7} {'s/batch':>9} {'img/s':>9}")
    for name in args.presets.split(","):
        batch = PAPER_BATCH if name == "paper" else PRESETS[name].batch_size
        ips, spb = bench(name, args.batches, batch)
        h, w = PRESETS[name].input_size
        print(f"{name:<8} {f'{h}x{w}':<9} {batch:>5} {args.batches:>7} {spb:>9.3f} {ips:>9.1f}")


if __name__ == "__main__":
    main()
