"""Configuration: defaults, YAML, environment overrides, secrets, --validate-config."""

from __future__ import annotations

from pathlib import Path

import pytest

from deploy.cli import main
from deploy.config import AppConfig, load_config
from deploy.exceptions import ConfigError


def test_every_field_has_a_default_and_description() -> None:
    def walk(model: type) -> None:
        for name, field in model.model_fields.items():  # type: ignore[attr-defined]
            assert field.description, f"{model.__name__}.{name} has no description"
            annotation = field.annotation
            if isinstance(annotation, type) and hasattr(annotation, "model_fields"):
                walk(annotation)

    walk(AppConfig)
    config = load_config(environ={})
    assert config.mqtt.broker == "embedded"
    assert config.outbox.synchronous == "full"


def test_yaml_then_env_then_overrides(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("mqtt:\n  prefix: a/b\n  max_inflight: 3\ndevice:\n  id: yaml-dev\n")
    env = {
        "OMIS_MQTT__MAX_INFLIGHT": "7",
        "OMIS_MQTT__TLS__INSECURE": "true",
        "OMIS_STATE_DIR": "x",
    }
    config = load_config(path, environ=env, overrides={"device": {"id": "cli-dev"}})
    assert config.mqtt.prefix == "a/b"
    assert config.mqtt.max_inflight == 7
    assert config.mqtt.tls.insecure is True
    assert config.device.id == "cli-dev"


@pytest.mark.parametrize(
    ("text", "env", "key"),
    [
        ("mqtt:\n  brokr: x\n", {}, "mqtt.brokr"),
        ("", {"OMIS_OUTBOX__MAX_ROWS": "0"}, "outbox.max_rows"),
        ("", {"OMIS_NOPE__X": "1"}, "nope"),
        ("mqtt:\n  reconnect_min_s: 10\n  reconnect_max_s: 1\n", {}, "mqtt"),
        ("device:\n  id: bad/id\n", {}, "device.id"),
        ("mqtt:\n  tls:\n    cert_file: c.pem\n", {}, "mqtt.tls"),
    ],
)
def test_errors_name_the_offending_key(
    tmp_path: Path, text: str, env: dict[str, str], key: str
) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path, environ=env)
    assert str(info.value).startswith(key)


def test_secrets_from_files_and_environment(tmp_path: Path) -> None:
    (tmp_path / "pw").write_text("s3cret\n")
    (tmp_path / "pp").write_text("phrase")
    path = tmp_path / "c.yaml"
    path.write_text(
        f"mqtt:\n  username: dev\n  password_file: {tmp_path / 'pw'}\n"
        f"  tls:\n    key_passphrase_file: {tmp_path / 'pp'}\n"
    )
    config = load_config(path, environ={})
    assert config.mqtt.password is not None
    assert config.mqtt.password.get_secret_value() == "s3cret"
    assert "s3cret" not in repr(config)
    assert config.mqtt.tls.key_passphrase is not None
    assert config.mqtt.tls.key_passphrase.get_secret_value() == "phrase"
    from_env = load_config(environ={"OMIS_MQTT__PASSWORD": "envpw"})
    assert from_env.mqtt.password is not None
    assert from_env.mqtt.password.get_secret_value() == "envpw"
    missing = tmp_path / "m.yaml"
    missing.write_text(f"mqtt:\n  password_file: {tmp_path / 'absent'}\n")
    with pytest.raises(ConfigError, match=r"mqtt\.password_file"):
        load_config(missing, environ={})


def test_validate_config_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = tmp_path / "good.yaml"
    good.write_text("mqtt:\n  broker: mqtt://broker.local:1883\n")
    assert main(["serve", "--config", str(good), "--validate-config"]) == 0
    assert capsys.readouterr().out.strip() == "OK"
    bad = tmp_path / "bad.yaml"
    bad.write_text("scan:\n  queue_size: -1\n")
    assert main(["serve", "--config", str(bad), "--validate-config"]) == 1
    assert "scan.queue_size" in capsys.readouterr().err
    url = tmp_path / "url.yaml"
    url.write_text("mqtt:\n  broker: http://x\n")
    assert main(["serve", "--config", str(url), "--validate-config"]) != 0
    assert "http://x" in capsys.readouterr().err


def test_ota_section_reaches_the_daemon(tmp_path: Path) -> None:
    from broker_support import FakeScanner

    from deploy.appliance.service import Appliance

    path = tmp_path / "c.yaml"
    path.write_text("ota:\n  health_slides: 5\n  health_seconds: 90\n  transfer_timeout_s: 42\n")
    config = load_config(path, environ={"OMIS_OTA__HEALTH_CHECK_INTERVAL_S": "2.5"})
    app = Appliance(config, tmp_path / "state", FakeScanner())
    settings = app.ota.settings
    assert (settings.health.slides, settings.health.seconds) == (5, 90.0)
    assert settings.health.check_interval_s == 2.5
    assert settings.transfer_timeout_s == 42.0
    assert settings.need_after_s == config.ota.need_after_s == 5.0
    with pytest.raises(ConfigError, match=r"ota\.health_slides"):
        load_config(environ={"OMIS_OTA__HEALTH_SLIDES": "0"})


def test_inference_section_is_validated(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = tmp_path / "good.yaml"
    good.write_text(
        "inference:\n  backend: onnxruntime\n  precision: fp32\n  spectrum_backend: numpy\n"
        "  max_batch: 4\n  opt_batch: 2\n"
    )
    assert main(["serve", "--config", str(good), "--validate-config"]) == 0
    config = load_config(good, environ={})
    assert (config.inference.backend, config.inference.spectrum_backend) == ("onnxruntime", "numpy")
    for text, where in (
        ("inference:\n  backend: tpu\n", "inference.backend"),
        ("inference:\n  precision: int8\n", "inference.precision"),
        ("inference:\n  spectrum_backend: opencl\n", "inference.spectrum_backend"),
        ("inference:\n  max_batch: 2\n  opt_batch: 4\n", "opt_batch must be <= max_batch"),
        ("inference:\n  ort_provider: cuda\n", "needs backend onnxruntime"),
        ("inference:\n  device: cuda\n", "needs backend torch"),
    ):
        bad = tmp_path / "bad.yaml"
        bad.write_text(text)
        capsys.readouterr()
        assert main(["serve", "--config", str(bad), "--validate-config"]) == 1
        err = capsys.readouterr().err.strip()
        assert where in err and "\n" not in err, err


def test_inference_section_never_falls_back_silently(tmp_path: Path) -> None:
    """A spectrum backend asked for by name that cannot start stops the scan, in one line."""
    import subprocess
    import sys

    from fakes.bundles import make_bundle

    make_bundle(tmp_path / "bundle")
    cfg = tmp_path / "omis.yaml"
    cfg.write_text("inference:\n  spectrum_backend: cuda\n")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "deploy.cli",
            "scan",
            "--config",
            str(cfg),
            "--microscope",
            "sim://",
            "--bundle",
            str(tmp_path / "bundle"),
            "--state-dir",
            str(tmp_path / "state"),
        ],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1
    assert "CUDA" in done.stderr.splitlines()[-1], done.stderr[-1500:]
    assert "Traceback" not in done.stderr
