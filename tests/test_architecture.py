"""Architecture rules that code review alone would let slip.

* Imports go one way: ``training`` and ``deploy`` may import ``inference``; ``inference`` may
  import ``firmware_bridge``; never the reverse.
* No import cycle between the modules of a package, counting every import (module level,
  ``TYPE_CHECKING`` blocks and imports inside functions).
* The device side never imports torch at module level, and its subcommands work without
  torch installed at all.
* The repository is self-contained: no tracked file points at files outside it.
"""

from __future__ import annotations

import ast
import graphlib
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


def _module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imported_names(path: Path, module: str) -> list[str]:
    """Every dotted name an import in ``path`` may refer to (``from a import b``: a and a.b)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    names: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join([*package[: len(package) - node.level + 1], *filter(None, [base])])
            names += [base, *(f"{base}.{a.name}" for a in node.names)]
    return names


def _import_graph(package: str) -> dict[str, set[str]]:
    """Module -> the modules of the same package it imports, wherever the import stands."""
    modules = {_module_name(f): f for f in _files(package)}
    graph: dict[str, set[str]] = {}
    for module, path in modules.items():
        deps: set[str] = set()
        for imported in _imported_names(path, module):
            name = imported
            while name and name not in modules:  # a.b.func -> a.b
                name = name.rpartition(".")[0]
            if name and name != module:
                deps.add(name)
        graph[module] = deps
    return graph


@pytest.mark.parametrize("package", PACKAGES)
def test_no_import_cycle(package: str) -> None:
    graph = _import_graph(package)
    assert graph, f"no modules found in {package}"
    try:
        graphlib.TopologicalSorter(graph).prepare()
    except graphlib.CycleError as exc:
        pytest.fail(f"import cycle in {package}: {' -> '.join(exc.args[1])}")


def test_import_cycle_check_sees_lazy_and_type_checking_imports(tmp_path: Path) -> None:
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import pkg.b\n"
    )
    (pkg / "b.py").write_text("def f() -> None:\n    from . import a\n")
    names = {
        _module_name(f, tmp_path): _imported_names(f, _module_name(f, tmp_path))
        for f in sorted(pkg.glob("*.py"))
    }
    assert "pkg.b" in names["pkg.a"]
    assert "pkg.a" in names["pkg.b"]


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


# Written in pieces so that this file does not match itself.
OUTSIDE_REFERENCES = ("OMIS_SPECTRUM" + ".md", "../" + "shared", "/work" + "/")


def test_repository_refers_to_no_file_outside_it() -> None:
    tracked = subprocess.run(
        ["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True
    ).stdout.decode()
    bad = []
    for name in filter(None, tracked.split("\0")):
        path = ROOT / name
        if not path.is_file():
            continue
        text = path.read_bytes().decode("utf-8", errors="replace")
        bad += [f"{name}: {ref}" for ref in OUTSIDE_REFERENCES if ref in text]
    assert not bad, "references to files outside the repository:\n" + "\n".join(bad)
