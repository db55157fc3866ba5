"""Architecture rules that code review alone would let slip.

* Imports go one way: ``training`` and ``deploy`` may import ``inference``; ``inference`` may
  import ``firmware_bridge``; never the reverse.
* The device side never imports torch at module level, and its subcommands work without
  torch installed at all.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

from firmware_bridge.images import write_png
from firmware_bridge.sim.sample import slide_for

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("firmware_bridge", "inference", "training", "deploy")
# package -> packages it must never import
FORBIDDEN = {
    "firmware_bridge": {"inference", "training", "deploy"},
    "inference": {"training", "deploy"},
    "training": {"deploy"},
    "deploy": {"training"},
}
DEVICE_SIDE = ("firmware_bridge", "inference", "deploy")
# Modules that import training lazily, inside a handler, by design.
LAZY_TRAINING_OK = {"deploy/cli.py"}


def _imports(path: Path) -> list[tuple[str, bool]]:
    """(top-level module, imported at module level?) for every import in a file."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    top_level = {id(node) for node in tree.body}
    found: list[tuple[str, bool]] = []
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        found += [(n.split(".")[0], id(node) in top_level) for n in names]
    return found


def _files(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


@pytest.mark.parametrize("package", PACKAGES)
def test_imports_go_one_way(package: str) -> None:
    bad = [
        f"{f.relative_to(ROOT)} imports {mod}"
        for f in _files(package)
        for mod, _ in _imports(f)
        if mod in FORBIDDEN[package]
        and not (mod == "training" and str(f.relative_to(ROOT)) in LAZY_TRAINING_OK)
    ]
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("package", DEVICE_SIDE)
def test_device_side_never_imports_torch_at_module_level(package: str) -> None:
    bad = [
        str(f.relative_to(ROOT))
        for f in _files(package)
        for mod, at_top in _imports(f)
        if mod == "torch" and at_top
    ]
    assert not bad, f"torch imported at module level in {bad}"


def _no_torch_env(tmp_path: Path) -> dict[str, str]:
    """An environment in which ``import torch`` fails, as on a device without the extra."""
    blocker = tmp_path / "blocker"
    blocker.mkdir()
    (blocker / "torch.py").write_text("raise ImportError('torch is not installed (test)')\n")
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(blocker), str(ROOT)])}


def test_device_subcommands_work_without_torch(tmp_path: Path) -> None:
    env = _no_torch_env(tmp_path)
    omis = [sys.executable, "-m", "deploy.cli"]
    check = subprocess.run(
        [sys.executable, "-c", "import torch"], env=env, capture_output=True, check=False
    )
    assert check.returncode != 0, "the torch blocker does not work"
    slide = slide_for(0, seed=1)
    x_um, y_um = next(xy for xy in slide.field_positions(20) if slide.field_fault(*xy) == "ok")
    diffuse, polarized = slide.render_pair(x_um, y_um, size=(160, 128))
    w, p = tmp_path / "w.png", tmp_path / "p.png"
    write_png(w, diffuse)
    write_png(p, polarized)
    for argv in (
        ["--help"],
        ["spectrum", str(w), str(p), "--json", "--backend", "numpy"],
        ["ota", "status", "--state-dir", str(tmp_path / "state"), "--json"],
        ["serve", "--validate-config"],
    ):
        r = subprocess.run([*omis, *argv], env=env, capture_output=True, text=True, check=False)
        assert r.returncode == 0, (argv, r.stderr[-2000:])
        assert "torch" not in r.stderr.lower(), (argv, r.stderr[-2000:])
