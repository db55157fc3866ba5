"""Hostile input at the command line: one line naming the problem, no traceback, nothing left.

Each case here was a traceback, a stray decoder line, an accepted bad value or a left-over
directory on the code before issue 14 (docs/security.md lists them).
"""

from __future__ import annotations

import os
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest

from deploy import cli
from deploy.exceptions import SchemaError
from deploy.schemas import load_schema, validate
from firmware_bridge.exceptions import InputError
from firmware_bridge.images import MAX_IMAGE_PIXELS, encode_png, image_dimensions, read_rgb
from firmware_bridge.limits import IDENTIFIER_PATTERN, check_identifier, is_identifier

ROOT = Path(__file__).resolve().parents[1]


def omis(
    *args: str, cwd: Path | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMIS_STATE_DIR": str(cwd or ROOT / "nostate")}
    return subprocess.run(
        [sys.executable, "-m", "deploy.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=cwd,
        check=False,
    )


def assert_one_line(proc: subprocess.CompletedProcess[str], *needles: str) -> str:
    """Non-zero exit, exactly one stderr line (ignoring INFO logs), no traceback."""
    assert proc.returncode != 0, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if " INFO " not in ln]
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    crc = zlib.crc32(kind + data) & 0xFFFFFFFF
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)


def bomb_png(width: int, height: int) -> bytes:
    """A tiny PNG whose header declares ``width`` x ``height`` RGB pixels."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" * 16)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", idat)
        + (_png_chunk(b"IEND", b""))
    )


@pytest.fixture
def good_png(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    path = tmp_path / "good.png"
    path.write_bytes(encode_png(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)))
    return path


# -- images ---------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [(100_000, 100_000), (10_000, 5_001), (2**31 - 1, 1)])
def test_image_header_bomb_refused_before_decoding(tmp_path: Path, size: tuple[int, int]) -> None:
    path = tmp_path / "bomb.png"
    path.write_bytes(bomb_png(*size))
    assert path.stat().st_size < 100
    with pytest.raises(InputError, match="limit"):
        read_rgb(path)


def test_image_limit_is_the_documented_one() -> None:
    assert MAX_IMAGE_PIXELS == 50_000_000
    assert "50,000,000" in (ROOT / "docs" / "security.md").read_text("utf-8") or (
        "50 MP" in (ROOT / "docs" / "security.md").read_text("utf-8")
    )
    assert image_dimensions(bomb_png(7_000, 7_000)) == (7_000, 7_000)


def test_spectrum_on_header_bomb_is_one_line(tmp_path: Path, good_png: Path) -> None:
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(bomb_png(100_000, 100_000))
    proc = omis("spectrum", str(bomb), str(good_png), cwd=tmp_path)
    assert_one_line(proc, "bomb.png", "limit")


def test_corrupt_png_decoder_message_goes_into_the_one_line(tmp_path: Path, good_png: Path) -> None:
    data = bytearray(good_png.read_bytes())
    for i in range(60, len(data) - 20, 7):
        data[i] ^= 0x55
    bad = tmp_path / "corrupt.png"
    bad.write_bytes(bytes(data))
    proc = omis("spectrum", str(bad), str(good_png), cwd=tmp_path)
    line = assert_one_line(proc, "corrupt.png")
    assert "libpng error" in line  # the decoder's reason, inside our line
    assert not proc.stderr.startswith("libpng")


# -- numbers ----------------------------------------------------------------------------------


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_params_refused(tmp_path: Path, good_png: Path, constant: str) -> None:
    proc = omis(
        "spectrum",
        str(good_png),
        str(good_png),
        "--params",
        f'{{"lambda_b_nm": {constant}}}',
        "--json",
        cwd=tmp_path,
    )
    assert_one_line(proc, "--params", constant)
    assert proc.stdout == ""


def test_pydantic_models_refuse_non_finite_numbers() -> None:
    from pydantic import ValidationError

    from inference.spectrum.params import parse_params

    with pytest.raises((ValidationError, ValueError)):
        parse_params({"lambda_b_nm": float("nan")})


# -- identifiers and counts -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "ok"),
    [
        ("A1", True),
        ("sim0-0001", True),
        ("a" * 64, True),
        ("a.b_c-d", True),
        ("A1\n", False),
        ("../../x", False),
        (".hidden", False),
        ("a" * 65, False),
        ("", False),
        ("a/b", False),
        ("a b", False),
        ("é", False),
        ("A1\x00", False),
    ],
)
def test_one_identifier_definition(value: str, ok: bool) -> None:
    assert is_identifier(value) is ok
    for name, field in (("cmd_scan", "slide_id"), ("cmd_cancel", "scan_id")):
        request = {field: value} if name == "cmd_scan" else {"scan_id": value}
        if ok:
            validate(name, request)
        else:
            with pytest.raises(SchemaError):
                validate(name, request)


def test_schemas_carry_the_shared_pattern() -> None:
    id_fields = {
        "cmd_scan": ("slide_id", "device_id"),
        "cmd_cancel": ("scan_id", "device_id"),
        "cmd_status": ("device_id",),
        "status": ("device_id",),
        "metrics": ("device_id",),
        "reply": ("device_id",),
        "result": ("slide_id", "scan_id", "device_id"),
    }
    for name, fields in id_fields.items():
        props = load_schema(name)["properties"]
        for field in fields:
            # an optional id is {"anyOf": [{"pattern": ...}, {"type": "null"}]}
            choices = props[field].get("anyOf", [props[field]])
            patterns = [c["pattern"] for c in choices if "pattern" in c]
            assert patterns == [IDENTIFIER_PATTERN], (name, field)


def test_config_device_id_uses_the_shared_pattern() -> None:
    from deploy.config import load_config
    from deploy.exceptions import ConfigError

    assert load_config(overrides={"device": {"id": "scope-08"}}).device.id == "scope-08"
    for bad in ("A1\n", "../x", "a" * 65):
        with pytest.raises(ConfigError, match=r"device\.id"):
            load_config(overrides={"device": {"id": bad}})


def test_simulator_refuses_bad_slide_ids() -> None:
    from firmware_bridge.microscope import open_microscope

    with pytest.raises(InputError, match="not a valid id"):
        open_microscope("sim://?slide=../../x")


@pytest.mark.parametrize("slide_id", ["../../x", "A1\n"])
def test_scan_cli_refuses_bad_slide_id(tmp_path: Path, slide_id: str) -> None:
    proc = omis("scan", "--microscope", "sim://", "--slide-id", slide_id, cwd=tmp_path)
    assert_one_line(proc, "--slide-id", "not a valid id")


def test_synth_slide_count_bounded_before_allocation(tmp_path: Path) -> None:
    start = time.monotonic()
    proc = omis(
        "dataset",
        "synth",
        "--out",
        str(tmp_path / "ds"),
        "--slides",
        "1000000000000",
        cwd=tmp_path,
    )
    assert_one_line(proc, "--slides must be <= 100,000")
    assert time.monotonic() - start < 20
    assert not any(tmp_path.glob("*ds*"))
    proc = omis(
        "dataset",
        "synth",
        "--out",
        str(tmp_path / "ds"),
        "--slides",
        "2",
        "--fields",
        "1000000",
        cwd=tmp_path,
    )
    assert_one_line(proc, "--fields must be <=")


def test_check_identifier_names_the_option() -> None:
    with pytest.raises(InputError, match="--slide-id"):
        check_identifier("x\n", "--slide-id")


# -- partial outputs ----------------------------------------------------------------------------


def test_synth_sigterm_leaves_nothing_behind(tmp_path: Path) -> None:
    out = tmp_path / "ds"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "deploy.cli",
            "dataset",
            "synth",
            "--out",
            str(out),
            "--slides",
            "400",
            "--fields",
            "2",
            "--size",
            "160x128",
            "--workers",
            "1",
            "-q",
        ],
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    deadline = time.monotonic() + 60
    while not list(tmp_path.glob(".ds.*.partial/*")) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert list(tmp_path.glob(".ds.*.partial")), "synth never started writing"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == cli.EXIT_TERMINATED, err
    assert "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == []


# -- keys, weights, config ----------------------------------------------------------------------


def test_keygen_into_an_existing_file_is_one_line(tmp_path: Path) -> None:
    existing = tmp_path / "afile"
    existing.write_text("x")
    proc = omis("bundle", "keygen", "--out", str(existing), cwd=tmp_path)
    assert_one_line(proc, "afile")
    proc = omis("bundle", "keygen", "--out", str(existing / "sub"), cwd=tmp_path)
    assert_one_line(proc, "cannot write the key pair")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


def test_keygen_unwritable_leaves_no_half_pair(tmp_path: Path) -> None:
    from deploy.ota.exceptions import TrustError
    from deploy.ota.signing import generate_keypair

    out = tmp_path / "keys"
    out.mkdir()
    (out / "omis-bundle.pub").mkdir()  # the public half cannot be written
    with pytest.raises(TrustError):
        generate_keypair(out, "omis-bundle")
    assert sorted(p.name for p in out.iterdir()) == ["omis-bundle.pub"]


@pytest.mark.torch
def test_pretrained_text_file_is_a_config_error(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    from training.exceptions import ConfigError
    from training.model import build_model, get_preset, load_pretrained

    text = tmp_path / "weights.pth"
    for content in (b"hello\n", b"", b"\x80\x02}q\x00.", b"PK\x03\x04garbage"):
        text.write_bytes(content)
        with pytest.raises(ConfigError, match="not a readable state dict"):
            load_pretrained(build_model(get_preset("tiny"), 2), text)


def test_yaml_error_in_config_is_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1\nb: 2\n")
    proc = omis("serve", "--config", str(bad), "--validate-config", cwd=tmp_path)
    assert_one_line(proc, "not valid YAML at line 2")
    proc = omis("scan", "--config", str(bad), cwd=tmp_path)
    assert_one_line(proc, "not valid YAML at line 2")


def test_trust_list_fails_on_a_tampered_key(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    assert omis("bundle", "keygen", "--out", str(keys), cwd=tmp_path).returncode == 0
    state = tmp_path / "state"
    ok = omis("ota", "trust", str(keys / "omis-bundle.pub"), "--state-dir", str(state))
    assert ok.returncode == 0, ok.stderr
    assert omis("ota", "trust", "--list", "--state-dir", str(state)).returncode == 0
    other = tmp_path / "other"
    assert omis("bundle", "keygen", "--out", str(other), cwd=tmp_path).returncode == 0
    (trusted,) = (state / "trust").glob("*.pub")
    trusted.write_bytes((other / "omis-bundle.pub").read_bytes())
    proc = omis("ota", "trust", "--list", "--state-dir", str(state))
    assert_one_line(proc, "does not match its fingerprint")


# -- the top-level handler ----------------------------------------------------------------------


def test_unexpected_exception_is_one_line_with_a_hint(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def boom(args: object) -> int:
        raise RuntimeError("wires crossed\nsecond line")

    parser = cli.build_parser()
    args = parser.parse_args(["ota", "status"])
    monkeypatch.setattr(args, "handler", boom)
    assert cli._run(args) == cli.EXIT_INTERNAL
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "internal error: RuntimeError: wires crossed | second line" in err
    assert "-v" in err
    assert "Traceback" not in err


def test_os_error_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    def denied(args: object) -> int:
        raise PermissionError(13, "Permission denied", "/secret")

    args = cli.build_parser().parse_args(["ota", "status"])
    args.handler = denied
    assert cli._run(args) == cli.EXIT_ERROR
    assert capsys.readouterr().err == "omis ota: error: /secret: Permission denied\n"


@pytest.mark.torch
@pytest.mark.parametrize(("option", "value"), [("--epochs", "1000000000"), ("--folds", "1000000")])
def test_train_counts_bounded_before_anything_runs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], option: str, value: str
) -> None:
    pytest.importorskip("torch")
    argv = [
        "train",
        "--data",
        str(tmp_path / "nodata"),
        "--out",
        str(tmp_path / "out"),
        option,
        value,
    ]
    assert cli.main(argv) == cli.EXIT_ERROR
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and option in err and "less than or equal" in err, err
    assert not (tmp_path / "out").exists()


def test_synth_sigkill_leftover_is_removed_by_the_next_run(tmp_path: Path) -> None:
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    stale = tmp_path / f".ds.{dead}.0badc0de.partial"
    (stale / "sim0-0000").mkdir(parents=True)
    alive = tmp_path / f".ds.{os.getpid()}.feedbeef.partial"  # a run still in progress
    alive.mkdir()
    proc = omis("dataset", "synth", "--out", str(tmp_path / "ds"), "--slides", "1", "--fields",
                "1", "--size", "64x48", "--workers", "1", "-q", cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["ds", alive.name])
