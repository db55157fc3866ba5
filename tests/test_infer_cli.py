"""``omis infer``, ``omis bench``, ``omis selftest`` and ``omis engine`` as real subprocesses."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from fakes.bundles import make_bundle, make_field

from firmware_bridge.images import write_png

OMIS = [sys.executable, "-m", "deploy.cli"]


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cli")
    make_bundle(root / "bundle")
    make_bundle(root / "bad", golden_offset=0.5)
    paths = {"root": root, "bundle": root / "bundle", "bad": root / "bad", "state": root / "state"}
    for i in range(2):
        w, p = make_field(i)
        paths[f"w{i}"] = write_png(root / f"w{i}.png", w)
        paths[f"p{i}"] = write_png(root / f"p{i}.png", p)
    return paths


def omis(*args: object, state: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMIS_STATE_DIR": str(state)}
    cmd = [*OMIS, *(str(a) for a in args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env, check=False)


def test_infer_json(env: dict[str, Path]) -> None:
    r = omis(
        "infer",
        "-q",
        "--bundle",
        env["bundle"],
        env["w0"],
        env["p0"],
        "--field",
        env["w1"],
        env["p1"],
        "--json",
        state=env["state"],
    )
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    for key in ("label", "probabilities", "risk", "abstained", "model", "backend", "timings_ms"):
        assert key in data
    assert data["label"] in ("low", "high") and set(data["probabilities"]) == {"low", "high"}
    assert data["backend"]["name"] == "onnxruntime"  # auto, without TensorRT here
    assert data["model"]["name"] == "tiny"
    assert [f["index"] for f in data["fields"]] == [0, 1]
    assert {"acquire", "qc", "spectrum", "render", "infer", "total"} <= set(data["timings_ms"])


def test_infer_text(env: dict[str, Path]) -> None:
    r = omis("infer", "-q", "--bundle", env["bundle"], env["w0"], env["p0"], state=env["state"])
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("label") and "backend    onnxruntime fp32" in r.stdout


def test_unavailable_backend_fails_with_one_line(env: dict[str, Path]) -> None:
    r = omis(
        "infer",
        "--bundle",
        env["bundle"],
        env["w0"],
        env["p0"],
        "--backend",
        "tensorrt",
        state=env["state"],
    )
    assert r.returncode == 1 and r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "TensorRT is not installed" in lines[0]


def test_infer_uses_the_active_model_or_says_there_is_none(env: dict[str, Path]) -> None:
    state = env["root"] / "state-active"
    r = omis("infer", env["w0"], env["p0"], state=state)
    assert r.returncode == 1 and "no active model in" in r.stderr and "pass --bundle" in r.stderr
    # Make it the active model the way an operator would: sign, trust, install.
    signed = env["root"] / "signed-bundle"
    shutil.copytree(env["bundle"], signed)
    keys = env["root"] / "keys"

    def ok(*argv: object) -> None:
        step = omis(*argv, state=state)
        assert step.returncode == 0, (argv, step.stderr)

    ok("bundle", "keygen", "--out", keys)
    ok("bundle", "sign", signed, "--key", next(p for p in keys.iterdir() if p.suffix != ".pub"))
    ok("ota", "trust", next(keys.glob("*.pub")))
    ok("ota", "install", signed)
    r = omis("infer", "-q", env["w0"], env["p0"], "--json", state=state)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["model"]["name"] == "tiny"


_SLOT = {
    "dir": "v1-0123456789ab-01234567",
    "name": "tiny",
    "version": 1,
    "sha256": "0" * 64,
    "manifest_sha256": "0" * 64,
    "signer": "k",
}


@pytest.mark.parametrize(
    "state_json",
    [
        None,
        {"current": _SLOT},
        {},
        {"current": {**_SLOT, "dir": "elsewhere"}},  # not a store slot name
        {"current": {"dir": _SLOT["dir"]}},  # a slot without its identity
        {"current": _SLOT, "surprise": 1},
        [],
    ],
)
def test_infer_reads_the_store_with_the_store_reader(tmp_path: Path, state_json: object) -> None:
    """``omis infer`` finds the active model exactly where the model store says it is."""
    from deploy.ota.exceptions import StoreError
    from deploy.ota.store import ModelStore
    from inference.cli_device import active_bundle_path
    from inference.exceptions import InferenceError

    if state_json is not None:
        (tmp_path / "models").mkdir()
        (tmp_path / "models" / "state.json").write_text(json.dumps(state_json))
    store = ModelStore(tmp_path)
    try:
        current = store.read_state().current
    except StoreError:
        with pytest.raises(InferenceError, match=r"state\.json"):
            active_bundle_path(tmp_path)
        return
    if current is None:
        with pytest.raises(InferenceError, match="no active model in"):
            active_bundle_path(tmp_path)
    else:
        assert active_bundle_path(tmp_path) == store.bundle_path(current)


def test_infer_odd_number_of_images(env: dict[str, Path]) -> None:
    r = omis("infer", "--bundle", env["bundle"], env["w0"], state=env["state"])
    assert r.returncode == 1 and "pairs" in r.stderr


def test_bench_json(env: dict[str, Path]) -> None:
    r = omis(
        "bench",
        "-q",
        "--bundle",
        env["bundle"],
        "--size",
        "64x48",
        "--fields",
        "2",
        "--slides",
        "2",
        "--json",
        state=env["state"],
    )
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert data["slides"] == 2 and data["fields"] == 4 and data["slides_per_s"] > 0
    for stage in ("acquire", "qc", "spectrum", "render", "infer", "total"):
        assert data["stages"][stage]["p95_ms"] >= data["stages"][stage]["median_ms"] >= 0


def test_selftest_passes(env: dict[str, Path]) -> None:
    r = omis("selftest", "-q", "--bundle", env["bundle"], "--json", state=env["state"])
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert data["passed"] and [c["name"] for c in data["checks"]] == [
        "spectrum",
        "backend",
        "golden",
        "slide",
    ]


def test_selftest_lists_failed_checks(env: dict[str, Path]) -> None:
    r = omis("selftest", "-q", "--bundle", env["bad"], state=env["state"])
    assert r.returncode == 1
    assert "FAIL  golden" in r.stdout and "failed checks: golden" in r.stderr


def test_engine_build_needs_tensorrt(env: dict[str, Path]) -> None:
    r = omis(
        "engine", "build", "--bundle", env["bundle"], "--precision", "fp16", state=env["state"]
    )
    assert r.returncode == 1
    assert len(r.stderr.strip().splitlines()) == 1 and "TensorRT" in r.stderr
    r = omis("engine", "list", "--json", state=env["state"])
    assert r.returncode == 0 and json.loads(r.stdout) == []


def test_torch_on_cuda_without_a_gpu_fails_with_one_line(env: dict[str, Path]) -> None:
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is present: this checks the machine without one")
    r = omis(
        "infer", "--bundle", env["bundle"], env["w0"], env["p0"],
        "--backend", "torch", "--device", "cuda", state=env["state"],
    )  # fmt: skip
    assert r.returncode == 1 and r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "no CUDA" in lines[0], r.stderr


def test_engine_list_survives_corrupt_sidecars(tmp_path: Path) -> None:
    engines = tmp_path / "engines"
    engines.mkdir(parents=True)
    (engines / "a-fp16-1.json").write_bytes(b"[" * 100_000)
    (engines / "b-fp16-2.json").write_text('{"schema": "omis.engine/1", "key": "x"}')
    (engines / "c-fp16-3.json").write_bytes(b"\xff\xfe\x00binary")
    for args in (("engine", "list"), ("engine", "list", "--json")):
        r = omis(*args, state=tmp_path)
        assert r.returncode == 0, r.stderr
        assert "Traceback" not in r.stderr
    assert list(engines.glob("*.json")) == []
