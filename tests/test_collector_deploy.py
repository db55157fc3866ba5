"""Deployment files and configuration of ``omis collect``: unit, compose, Dockerfile, config."""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from deploy.cli import build_parser
from deploy.collector.config import load_collector_config
from deploy.exceptions import ConfigError

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "deploy" / "systemd" / "omis-collect.service"


def test_unit_passes_systemd_analyze_and_runs_collect(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    assert analyze, "systemd-analyze not found (Debian package systemd)"
    omis = Path(sys.executable).parent / "omis"
    text = UNIT.read_text("utf-8")
    (tmp_path / UNIT.name).write_text(text.replace("/opt/omis/bin/omis", str(omis)), "utf-8")
    done = subprocess.run(
        [analyze, "verify", "--man=no", str(tmp_path / UNIT.name)],
        capture_output=True,
        text=True,
        check=False,
        cwd=tmp_path,
    )
    assert done.returncode == 0 and UNIT.name not in done.stderr, done.stderr
    exec_start = next(line for line in text.splitlines() if line.startswith("ExecStart="))
    args = build_parser().parse_args(shlex.split(exec_start.partition("=")[2])[1:])
    assert args.handler.__name__ == "_cmd_collect"
    assert "Restart=always" in text  # the broker holds the session only while it may come back


def test_compose_runs_two_instances_with_their_own_client_ids() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.lab.yml").read_text("utf-8"))
    commands = [compose["services"][name]["command"] for name in ("collect-a", "collect-b")]
    ids = {cmd[cmd.index("--client-id") + 1] for cmd in commands}
    assert len(ids) == 2
    parser = build_parser()
    for cmd in commands:
        assert parser.parse_args(cmd).handler.__name__ == "_cmd_collect"


def test_dockerfile_passes_hadolint() -> None:
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    done = subprocess.run(
        [hadolint, "--no-color", "--failure-threshold", "style", str(ROOT / "Dockerfile.collect")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_config_layers_and_secrets(tmp_path: Path) -> None:
    secret = tmp_path / "pw"
    secret.write_text("s3cret\n", "utf-8")
    file = tmp_path / "collect.yaml"
    file.write_text(
        "mqtt: {broker: 'mqtts://broker.lab:8883', group: ward-a}\n"
        "database: {url: 'postgresql://omis@db/omis'}\n",
        "utf-8",
    )
    env = {"OMIS_COLLECT_DATABASE__PASSWORD_FILE": str(secret), "OMIS_MQTT__BROKER": "ignored"}
    config = load_collector_config(file, environ=env, overrides={"http": {"port": 9000}})
    assert config.mqtt.group == "ward-a" and config.http.port == 9000
    assert config.database_url(tmp_path) == "postgresql://omis:s3cret@db/omis"
    assert load_collector_config(environ={}).database_url(tmp_path) == (
        f"sqlite:///{tmp_path / 'collector.sqlite'}"
    )


@pytest.mark.parametrize(
    ("overrides", "where"),
    [
        ({"mqtt": {"group": "a/b"}}, "mqtt.group"),
        ({"database": {"url": "mysql://x"}}, "database"),
        ({"http": {"accounts": [{"name": "x", "role": "admin", "password_hash": "h"}]}}, "role"),
        ({"htp": {}}, "htp"),
    ],
)
def test_bad_config_names_the_key(overrides: dict[str, object], where: str) -> None:
    with pytest.raises(ConfigError, match=where):
        load_collector_config(environ={}, overrides=overrides)


def test_cli_reports_bad_input_in_one_line(tmp_path: Path) -> None:
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "deploy.cli",
            "collect",
            "--http",
            "nope",
            "--state-dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        check=False,
        env=env,
        timeout=60,
    )
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        "omis collect: error: --http: expected HOST:PORT, got 'nope'"
    ]
    checked = subprocess.run(
        [
            sys.executable,
            "-m",
            "deploy.cli",
            "collect",
            "--validate-config",
            "--db",
            "postgresql://x@db/a",
        ],
        capture_output=True,
        text=True,
        check=True,
        env={**env, "OMIS_COLLECT_MQTT__PASSWORD": "hunter2"},
        timeout=60,
    )
    assert '"url": "postgresql://x@db/a"' in checked.stdout
    assert "hunter2" not in checked.stdout
    hashed = subprocess.run(
        [sys.executable, "-m", "deploy.cli", "collect", "--hash-password"],
        input="pw\n",
        capture_output=True,
        text=True,
        check=True,
        env=env,
        timeout=60,
    )
    from deploy.collector.auth import verify_password

    assert verify_password("pw", hashed.stdout.strip())
