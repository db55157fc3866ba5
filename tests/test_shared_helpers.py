"""The small shared helpers: state-dir resolution and the one-line pydantic error."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
from pydantic import BaseModel, ValidationError

from firmware_bridge.validation import first_error
from inference.state_dir import DEFAULT_STATE_DIR, resolve_state_dir


def test_state_dir_precedence_option_env_config_default() -> None:
    env = {"OMIS_STATE_DIR": "/env"}
    assert resolve_state_dir("/opt", "/cfg", env) == Path("/opt")
    assert resolve_state_dir(None, "/cfg", env) == Path("/env")
    assert resolve_state_dir(None, "/cfg", {}) == Path("/cfg")
    assert resolve_state_dir(None, None, {}) == DEFAULT_STATE_DIR
    assert resolve_state_dir("", None, {"OMIS_STATE_DIR": ""}) == DEFAULT_STATE_DIR


@pytest.mark.parametrize("given", [None, "/flag"])
def test_every_command_resolves_the_state_dir_alike(
    given: str | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    from deploy import cli_ota, commands
    from deploy.config import load_config
    from inference import cli_device
    from inference.backends import BackendOptions
    from inference.backends.tensorrt import state_dir_of

    monkeypatch.setenv("OMIS_STATE_DIR", "/from-env")
    args = argparse.Namespace(state_dir=given)
    expected = Path(given or "/from-env")
    config = load_config(environ={}, overrides={"device": {"state_dir": "/from-config"}})
    assert commands._state_dir(args, config) == expected
    assert cli_ota._state_dir(args) == expected
    assert cli_device.state_dir(args) == expected
    assert state_dir_of(BackendOptions(state_dir=given)) == expected


class _Inner(BaseModel):
    size: int


class _Outer(BaseModel):
    inner: _Inner


def test_first_error_names_the_dotted_key() -> None:
    with pytest.raises(ValidationError) as info:
        _Outer.model_validate({"inner": {"size": "big"}})
    assert first_error(info.value) == (
        "inner.size: Input should be a valid integer, unable to parse string as an integer"
    )
    assert "\n" not in first_error(info.value)
