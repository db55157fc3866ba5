"""Deployment files agree with the docs on the microscope device path (issue 14)."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def test_compose_and_docs_name_the_same_microscope_device() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.jetson.yml").read_text("utf-8"))
    devices = compose["services"]["omis"]["devices"]
    inside = {entry.split(":")[1] for entry in devices}
    docs = (ROOT / "docs" / "deploy.md").read_text("utf-8")
    configured = set(re.findall(r"microscope: serial://(/dev/[\w.-]+)", docs))
    assert configured == {"/dev/omis-microscope"}
    assert configured <= inside, (
        f"the container sees {sorted(inside)}, the config names {configured}"
    )
    for line in re.findall(r"--device (\S+)", docs):
        host, _, container = line.partition(":")
        if "microscope" in host:
            assert container in configured
