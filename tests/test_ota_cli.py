"""The ``omis bundle`` and ``omis ota`` commands, run as real subprocesses."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from ota_support import make_bundle

OMIS = [sys.executable, "-m", "deploy.cli"]


def omis(*args: str | Path, state: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMIS_STATE_DIR": str(state)} if state else dict(os.environ)
    return subprocess.run(
        [*OMIS, *map(str, args)], capture_output=True, text=True, timeout=60, env=env, check=False
    )


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cli")


def test_keygen_sign_verify(work: Path) -> None:
    r = omis("bundle", "keygen", "--out", work / "keys", "--json")
    assert r.returncode == 0, r.stderr
    keys = json.loads(r.stdout)
    assert keys["public"].endswith(".pub")
    b = make_bundle(work / "b1", 1)
    r = omis("bundle", "sign", b, "--key", keys["private"])
    assert r.returncode == 0, r.stderr
    r = omis("bundle", "verify", b, "--pubkey", keys["public"], "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["version"] == 1
    (b / "golden" / "extra.npy").write_bytes(b"x")
    r = omis("bundle", "verify", b, "--pubkey", keys["public"])
    assert r.returncode == 1
    assert "unlisted file(s): golden/extra.npy" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_trust_install_status_rollback(work: Path, tmp_path: Path) -> None:
    state = tmp_path / "state"
    r = omis("bundle", "keygen", "--out", tmp_path / "k", "--name", "fleet", "--json")
    keys = json.loads(r.stdout)
    r = omis("ota", "trust", keys["public"], state=state)
    assert r.returncode == 0 and keys["fingerprint"] in r.stdout, r.stderr
    for v in (1, 2):
        make_bundle(tmp_path / f"v{v}", v, key=Path(keys["private"]))
        r = omis("ota", "install", tmp_path / f"v{v}", "--json", state=state)
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["model"]["version"] == v
    r = omis("ota", "status", "--json", state=state)
    st = json.loads(r.stdout)
    assert (st["current"], st["previous"], st["pending"]) == (2, 1, None)
    assert len(st["models"]["current"]["sha256"]) == 64
    # a downgrade is refused before anything changes, with the reason
    r = omis("ota", "install", tmp_path / "v1", state=state)
    assert r.returncode == 1 and "already installed" not in r.stderr
    assert "older than the current one" in r.stderr
    r = omis("ota", "rollback", state=state)
    assert r.returncode == 0, r.stderr
    assert "current   v1" in r.stdout
    r = omis("ota", "rollback", state=state)
    assert r.returncode == 1 and "nothing to roll back" in r.stderr
    r = omis("ota", "trust", "--list", "--json", state=state)
    assert json.loads(r.stdout)["keys"] == [keys["fingerprint"]]
    r = omis("ota", "trust", "--remove", keys["fingerprint"][:10], state=state)
    assert r.returncode == 0 and keys["fingerprint"] in r.stdout
    r = omis("ota", "status", state=state)
    assert "current   v1 tiny sha256" in r.stdout
