"""Data-parallel training under torchrun: 2 CPU processes, gloo, a few steps of the tiny net.

The test runs this file itself under ``torchrun --nproc_per_node 2``; each rank trains with
:func:`training.train.fit` and writes a checksum of its weights, which must agree across ranks.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def _worker(out_dir: str) -> None:
    import torch

    from training.model import PRESETS, build_model
    from training.train import FitConfig, SpectrumImages, distributed, fit, seed_everything

    with distributed("cpu") as info:
        seed_everything(0)
        preset = PRESETS["tiny"]
        h, w = preset.input_size
        rng = np.random.default_rng(0)
        x = rng.normal(size=(12, 3, h, w)).astype(np.float32)
        y = np.array([0, 1] * 6, dtype=np.int64)
        model = build_model(preset, 2)
        cfg = FitConfig(epochs=2, batch_size=3, patience=5, seed=0)
        res = fit(model, SpectrumImages(x, y), x[:4], y[:4], cfg=cfg, num_classes=2)
        flat = torch.cat([p.detach().flatten() for p in model.parameters()])
        record = {
            "rank": info.rank,
            "world": info.world_size,
            "epochs": res.epochs_run,
            "checksum": float(flat.double().sum()),
            "first": flat[:5].tolist(),
        }
        Path(out_dir, f"rank{info.rank}.json").write_text(json.dumps(record))


# torchrun --standalone picks a free port by binding and releasing it; on a shared machine
# another process can take it first.  Only that failure is retried.
PORT_RACE = ("EADDRINUSE", "address already in use", "DistNetworkError")


def _torchrun(tmp_path: Path) -> tuple[int, str]:
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "OMP_NUM_THREADS": "1",
        "GLOO_SOCKET_IFNAME": "lo",
    }
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    cmd += ["--nproc_per_node", "2", str(Path(__file__)), str(tmp_path)]
    # own process group, so a hang kills torchrun's workers too, not just torchrun
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=ROOT,
        start_new_session=True,
    )
    try:
        _, stderr = proc.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    return proc.returncode, stderr


def test_two_process_gloo(tmp_path: Path) -> None:
    rc, stderr = _torchrun(tmp_path)
    if rc != 0 and any(s in stderr for s in PORT_RACE):
        rc, stderr = _torchrun(tmp_path)
    assert rc == 0, stderr[-3000:]
    r0 = json.loads((tmp_path / "rank0.json").read_text())
    r1 = json.loads((tmp_path / "rank1.json").read_text())
    assert (r0["world"], r1["world"]) == (2, 2)
    assert r0["epochs"] == r1["epochs"] == 2
    # DDP all-reduces the gradients: both replicas hold the same weights after training
    assert r0["first"] == r1["first"]
    assert r0["checksum"] == r1["checksum"]


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    _worker(sys.argv[1])
