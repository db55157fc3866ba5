"""Engine cache: keys, atomic plan + sidecar writes, stale and corrupt entries."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest

from inference.engine_cache import EngineCache, EngineKey
from inference.exceptions import EngineError

KEY = EngineKey(
    onnx_sha256="ab" * 32,
    trt_version="10.3.0",
    gpu_name="Orin",
    compute_capability="8.7",
    precision="fp16",
    min_shape=(1, 3, 224, 224),
    opt_shape=(1, 3, 224, 224),
    max_shape=(8, 3, 224, 224),
)


@pytest.mark.parametrize(
    "change",
    [
        {"onnx_sha256": "cd" * 32},
        {"trt_version": "10.4.0"},
        {"gpu_name": "Xavier"},
        {"compute_capability": "7.2"},
        {"precision": "fp32"},
        {"max_shape": (16, 3, 224, 224)},
        {"opt_shape": (4, 3, 224, 224)},
        {"dla_core": 0},
        {"version_compatible": True},
    ],
)
def test_every_key_field_changes_the_file(change: dict[str, object]) -> None:
    other = dataclasses.replace(KEY, **change)  # type: ignore[arg-type]
    assert other.digest() != KEY.digest()
    assert other.file_stem() != KEY.file_stem()


def test_key_round_trips_and_is_stable() -> None:
    assert EngineKey.from_json(json.loads(json.dumps(KEY.to_json()))) == KEY
    assert KEY.digest() == dataclasses.replace(KEY).digest()
    assert KEY.file_stem().startswith("abababababab-fp16-")


def test_store_writes_plain_plan_and_sidecar(tmp_path: Path) -> None:
    cache = EngineCache(tmp_path)
    plan = b"\x00plan bytes exactly as TensorRT serialised them"
    path = cache.store(KEY, plan)
    assert path.read_bytes() == plan  # no header glued on
    side = json.loads(cache.sidecar_path(KEY).read_text())
    assert side["schema"] == "omis.engine/1" and side["key"] == KEY.to_json()
    assert cache.load(KEY) == plan
    assert [p.name for p in cache.root.iterdir() if p.name.endswith(".tmp")] == []
    assert cache.entries()[0]["key"]["precision"] == "fp16"


def test_failed_write_leaves_nothing_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = EngineCache(tmp_path)

    def boom(src: str, dst: str) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        cache.store(KEY, b"plan")
    monkeypatch.undo()
    assert list(cache.root.iterdir()) == []
    assert cache.load(KEY) is None


def test_plan_without_sidecar_is_an_interrupted_write(tmp_path: Path) -> None:
    cache = EngineCache(tmp_path)
    cache.store(KEY, b"plan")
    cache.sidecar_path(KEY).unlink()
    assert cache.load(KEY) is None


@pytest.mark.parametrize("damage", ["sidecar_garbage", "sidecar_other_key", "plan_altered"])
def test_inconsistent_entries_are_removed(tmp_path: Path, damage: str) -> None:
    cache = EngineCache(tmp_path)
    cache.store(KEY, b"plan")
    side = cache.sidecar_path(KEY)
    if damage == "sidecar_garbage":
        side.write_text("{not json")
    elif damage == "sidecar_other_key":
        meta = json.loads(side.read_text())
        meta["key"]["trt_version"] = "8.6.1"
        side.write_text(json.dumps(meta))
    else:
        cache.plan_path(KEY).write_bytes(b"plaN")
    assert cache.load(KEY) is None
    assert not cache.plan_path(KEY).exists() and not side.exists()


def test_get_or_build_rebuilds_what_does_not_deserialise(tmp_path: Path) -> None:
    cache = EngineCache(tmp_path)
    cache.store(KEY, b"stale plan")
    builds: list[int] = []

    def build() -> bytes:
        builds.append(1)
        return b"good plan"

    def deserialize(plan: bytes) -> str | None:
        if plan == b"stale plan":
            raise EngineError("magic tag does not match")
        return "engine" if plan == b"good plan" else None

    engine, built = cache.get_or_build(KEY, build, deserialize)
    assert (engine, built, len(builds)) == ("engine", True, 1)
    assert cache.load(KEY) == b"good plan"
    engine, built = cache.get_or_build(KEY, build, deserialize)
    assert (engine, built, len(builds)) == ("engine", False, 1)


def test_fresh_plan_that_does_not_deserialise_is_an_error(tmp_path: Path) -> None:
    cache = EngineCache(tmp_path)
    with pytest.raises(EngineError, match="freshly built"):
        cache.get_or_build(KEY, lambda: b"bad", lambda plan: None)
    assert cache.load(KEY) is None


CORRUPT_SIDECARS = {
    "truncated": b'{"schema": "omis.engine/1", "key": {"onnx_sha',
    "binary": bytes(range(256)),
    "deep": b"[" * 100_000 + b"]" * 100_000,
    "not_an_object": b"[1, 2, 3]",
    "key_is_a_string": b'{"schema": "omis.engine/1", "key": "abc", "plan_sha256": "00"}',
    "wrong_types": json.dumps(
        {
            "schema": "omis.engine/1",
            "key": {**KEY.to_json(), "onnx_sha256": 7, "max_shape": "x"},
            "plan_sha256": 1,
            "plan_bytes": "many",
        }
    ).encode(),
    "schema_is_a_list": b'{"schema": ["omis.engine/1"], "key": {}}',
}


@pytest.mark.parametrize("kind", sorted(CORRUPT_SIDECARS))
def test_corrupt_sidecar_is_an_invalid_entry_removed(
    tmp_path: Path, kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    cache = EngineCache(tmp_path)
    cache.store(KEY, b"plan")
    cache.sidecar_path(KEY).write_bytes(CORRUPT_SIDECARS[kind])
    assert cache.entries() == []  # never a traceback: the entry is invalid
    assert not cache.sidecar_path(KEY).exists() and not cache.plan_path(KEY).exists()
    warnings = [r for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "\n" not in warnings[0].getMessage()
    cache.store(KEY, b"plan")
    cache.sidecar_path(KEY).write_bytes(CORRUPT_SIDECARS[kind])
    assert cache.load(KEY) is None
    assert not cache.plan_path(KEY).exists()
    cache.store(KEY, b"plan")  # a clean state: the entry is rebuilt and listed
    assert [e["key"] for e in cache.entries()] == [KEY.to_json()]


def test_sidecars_that_are_not_files_are_skipped(tmp_path: Path) -> None:
    cache = EngineCache(tmp_path)
    cache.store(KEY, b"plan")
    (cache.root / "dir.json").mkdir()
    os.mkfifo(cache.root / "fifo.json")  # opening it would block for ever
    assert [e["key"] for e in cache.entries()] == [KEY.to_json()]
