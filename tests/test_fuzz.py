"""Hypothesis fuzz suite over every edge that takes hostile input (docs/security.md).

Each test asserts: a documented error or success, never an unexpected exception, nothing left
behind.  Bounded in count (``max_examples``) and time (deadlines, per-reply timeouts); the
MQTT part goes through a real mosquitto to a real appliance.  Case counts are listed in
docs/security.md ("Fuzz suite").
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import tarfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from broker_support import (
    Collector,
    FakeScanner,
    Mosquitto,
    app_config,
    publish,
    wait_until,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from ota_support import make_bundle, make_keys

from deploy.appliance.service import Appliance
from deploy.broker import find_mosquitto
from deploy.cli import build_parser
from deploy.config import load_config
from deploy.exceptions import ConfigError
from deploy.ota.exceptions import RejectedError
from deploy.ota.signing import load_public_key, manifest_verifier
from deploy.ota.unpack import verified_extract
from deploy.requests import RequestError, parse_command, reply_topics
from deploy.schemas import validate
from firmware_bridge.exceptions import InputError
from firmware_bridge.images import encode_png, read_rgb
from inference.bundle import parse_manifest
from inference.exceptions import BundleError

FUZZ = settings(
    max_examples=150,
    deadline=2000,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    derandomize=True,
)
JSON_LEAF = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
JSON = st.recursive(
    JSON_LEAF,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)
WORDS = st.sampled_from(
    ["spectrum", "infer", "scan", "serve", "dataset", "synth", "bundle", "keygen", "ota", "trust",
     "--json", "--slides", "--fields", "--params", "--slide-id", "--config", "-v", "-q", "--list",
     "--out", "--epochs", "--backend", "NaN", "1e999", "-1", "0", "../x", "A1\n", "\x00", "{}"]
)  # fmt: skip


def _tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


# -- CLI argument parsers ------------------------------------------------------------------------


@FUZZ
@given(argv=st.lists(WORDS | st.text(max_size=12), max_size=8))
def test_cli_parsers_only_parse_or_exit_with_usage(argv: list[str]) -> None:
    parser = build_parser()
    with (
        contextlib.redirect_stderr(io.StringIO()),
        contextlib.redirect_stdout(io.StringIO()),
    ):
        try:
            args = parser.parse_args(argv)
        except SystemExit as exc:
            assert exc.code in (0, 2)  # --help/--version, or a usage error
            return
    assert isinstance(args, argparse.Namespace)
    assert callable(args.handler)


# -- configuration loader ----------------------------------------------------------------------

SECTIONS = st.sampled_from(["device", "mqtt", "scan", "service", "inference", "outbox", "x"])
KEYS = st.sampled_from(["id", "broker", "prefix", "fields", "queue_size", "backend", "tls", "k"])


@FUZZ
@given(
    data=st.dictionaries(SECTIONS, st.dictionaries(KEYS, JSON, max_size=3), max_size=3) | JSON,
    raw=st.none() | st.text(max_size=60),
)
def test_config_loader_accepts_or_names_the_problem(
    tmp_path: Path, data: Any, raw: str | None
) -> None:
    path = tmp_path / "omis.yaml"
    path.write_text(raw if raw is not None else json.dumps(data), "utf-8")
    try:
        config = load_config(path, environ={})
    except ConfigError as exc:
        message = str(exc)
        assert message and "\n" not in message
        return
    assert config.device.id


# -- command payloads through a real mosquitto -----------------------------------------------------


@pytest.fixture(scope="module")
def appliance(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Mosquitto, Collector]]:
    if find_mosquitto() is None:
        pytest.skip("mosquitto is not installed")
    work = tmp_path_factory.mktemp("fuzz-broker")
    broker = Mosquitto(work).start()
    config = app_config(broker.url, mqtt={"max_command_bytes": 4096})
    app = Appliance(load_config(environ={}, overrides=config), work / "state", FakeScanner())
    try:
        with Collector(broker.port, "omis/v1/#") as col:
            app.start()
            loop = threading.Thread(target=app.run, daemon=True)
            loop.start()
            assert wait_until(lambda: b"online" in col.on("/availability"), 10)
            yield broker, col
            app.request_stop()
            loop.join(10)
    finally:
        app.shutdown()
        broker.stop()


PAYLOADS = (
    st.binary(max_size=64)
    | JSON.map(lambda v: json.dumps(v).encode())
    | st.integers(0, 3000).map(lambda n: b"[" * n + b"]" * n)
    | st.dictionaries(
        st.sampled_from(["slide_id", "scan_id", "device_id", "correlation_id", "fields", "x"]),
        JSON,
        max_size=4,
    ).map(lambda v: json.dumps(v).encode())
)
DOCUMENTED = {
    "too_large", "too_deep", "malformed", "invalid", "unknown_command", "wrong_device",
    "queue_full", "outbox_full", "stopping", "not_found", "unavailable", "rejected", "busy",
}  # fmt: skip


@settings(FUZZ, max_examples=40, deadline=None)
@given(
    verb=st.sampled_from(["status", "cancel", "scan", "nope"]),
    payload=PAYLOADS,
    n=st.integers(0, 10**9),
)
def test_mqtt_commands_get_one_documented_reply(
    appliance: tuple[Mosquitto, Collector], verb: str, payload: bytes, n: int
) -> None:
    broker, col = appliance
    correlation = f"fuzz-{n}-{time.monotonic_ns()}"
    publish(broker.port, f"omis/v1/dev1/cmd/{verb}", payload, correlation.encode())

    def mine() -> list[dict[str, Any]]:
        return [r for r in col.json_on(f"/cmd/{verb}/reply") if r["correlation_id"] == correlation
                or (r["correlation_id"] or "").startswith(correlation)]  # fmt: skip

    if not wait_until(lambda: len(mine()) >= 1, 5):
        # a JSON correlation_id field overrides the MQTT 5 one: find the reply by payload
        replies = col.json_on(f"/cmd/{verb}/reply")
        assert replies, "no reply at all"
        reply = replies[-1]
    else:
        (reply,) = mine()
    validate("reply", reply)
    if not reply["ok"]:
        assert reply["error"]["code"] in DOCUMENTED, reply
    assert all(json.loads(r) for r in col.on("/dev1/status"))  # the daemon still publishes


# -- pure request checks --------------------------------------------------------------------------


@FUZZ
@given(payload=PAYLOADS, limit=st.integers(1, 5000))
def test_request_parser_bounds(payload: bytes, limit: int) -> None:
    try:
        request = parse_command(payload, limit)
    except RequestError as exc:
        assert exc.code in {"too_large", "too_deep", "malformed"}
        return
    assert isinstance(request, dict) and len(payload) <= limit


@FUZZ
@given(topic=st.text(max_size=300) | st.sampled_from(["omis/v1/d/reply/u/x", "omis/v1/d/result"]))
def test_reply_topics_never_leave_the_reply_prefix(topic: str) -> None:
    topics, warning = reply_topics("omis/v1/d/cmd/status/reply", topic, "omis/v1", "d")
    assert topics[0] == "omis/v1/d/cmd/status/reply"
    for extra in topics[1:]:
        assert extra.startswith("omis/v1/d/reply/") and not set("+#\0") & set(extra)
    assert (warning is None) == (len(topics) == 2 or topic == topics[0])


# -- image headers ---------------------------------------------------------------------------------

_SEED_PNG = encode_png(np.random.default_rng(1).integers(0, 255, (24, 32, 3), dtype=np.uint8))


@FUZZ
@given(
    edits=st.lists(st.tuples(st.integers(0, len(_SEED_PNG) - 1), st.integers(0, 255)), max_size=6),
    cut=st.integers(0, len(_SEED_PNG)),
    dims=st.none() | st.tuples(st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1)),
)
def test_image_reader_reads_or_names_the_file(
    tmp_path: Path, capfd: pytest.CaptureFixture[str], edits: list[tuple[int, int]], cut: int,
    dims: tuple[int, int] | None,
) -> None:  # fmt: skip
    data = bytearray(_SEED_PNG[:cut] if cut > 33 else _SEED_PNG)
    if dims is not None:
        data[16:24] = dims[0].to_bytes(4, "big") + dims[1].to_bytes(4, "big")
    for pos, value in edits:
        if pos < len(data):
            data[pos] = value
    path = tmp_path / "fuzz.png"
    path.write_bytes(bytes(data))
    before = _tree(tmp_path)
    try:
        image = read_rgb(path)
    except InputError as exc:
        assert str(path) in str(exc) and "\n" not in str(exc)
    else:
        assert image.dtype == np.uint8 and image.ndim == 3
    assert "libpng" not in capfd.readouterr().err
    assert _tree(tmp_path) == before


# -- bundle manifests and archives -----------------------------------------------------------------


@FUZZ
@given(
    data=JSON
    | st.dictionaries(
        st.sampled_from(["schema", "name", "version", "files", "x"]), JSON, max_size=5
    ),
    raw=st.none() | st.binary(max_size=40),
)
def test_manifest_parser_accepts_or_names_the_key(data: Any, raw: bytes | None) -> None:
    if isinstance(data, dict):
        data = {"schema": "omis.bundle/1", **data}
    blob = raw if raw is not None else json.dumps(data).encode()
    try:
        parse_manifest(blob)
    except BundleError as exc:
        assert str(exc)


@pytest.fixture(scope="module")
def signed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    root = tmp_path_factory.mktemp("fuzz-bundle")
    priv, pub = make_keys(root / "keys", "k")
    bundle = make_bundle(root / "b", 2, key=priv)
    return bundle, manifest_verifier({"k": load_public_key(pub)})


@settings(FUZZ, max_examples=60)
@given(
    drop=st.sets(st.integers(0, 8), max_size=3),
    flip=st.none() | st.tuples(st.integers(0, 8), st.integers(0, 10_000)),
    extra=st.none() | st.tuples(st.text(min_size=1, max_size=12), st.binary(max_size=64)),
)
def test_archives_extract_only_what_is_signed(
    tmp_path: Path, signed: tuple[Path, Any], drop: set[int], flip: tuple[int, int] | None,
    extra: tuple[str, bytes] | None,
) -> None:  # fmt: skip
    bundle, verify = signed
    files = sorted(p for p in bundle.rglob("*") if p.is_file())
    archive = tmp_path / "fuzz.tar"
    with tarfile.open(archive, "w") as tf:
        for i, path in enumerate(files):
            if i in drop:
                continue
            data = bytearray(path.read_bytes())
            if flip is not None and flip[0] == i and data:
                data[flip[1] % len(data)] ^= 0x01
            info = tarfile.TarInfo(path.relative_to(bundle).as_posix())
            info.size = len(data)
            tf.addfile(info, io.BytesIO(bytes(data)))
        if extra is not None:
            info = tarfile.TarInfo(extra[0])
            info.size = len(extra[1])
            tf.addfile(info, io.BytesIO(extra[1]))
    dest = tmp_path / "dest"
    try:
        root = verified_extract(archive, dest, verify)
    except RejectedError as exc:
        assert str(exc)
    else:
        got = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
        assert got == [p.relative_to(bundle).as_posix() for p in files]
    finally:
        import shutil

        shutil.rmtree(dest, ignore_errors=True)
        archive.unlink()
    assert os.listdir(tmp_path) == []
