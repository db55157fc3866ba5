"""``omis ota shadow install | status | clear | promote`` on a state directory (in process).

The local command takes the same path as ``cmd/ota`` with ``mode: shadow``: the installer's
verify/place/golden gate, the same-spectrum rule, then the shadow slot; promote installs the
held candidate through the normal installer and drops the shadow.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from fakes.bundles import make_bundle
from ota_support import resigned, set_key

from deploy.cli import main
from deploy.ota import GoldenGate, Installer, ModelStore, TrustStore
from deploy.ota.shadow import ShadowStore
from deploy.ota.signing import generate_keypair, sign_bundle


@pytest.fixture
def state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    keys = generate_keypair(tmp_path / "keys", "k")
    bundles = {}
    for version in (1, 2, 3):
        b = make_bundle(tmp_path / f"v{version}", seed=version, version=version)
        sign_bundle(b.root, keys.private)
        bundles[version] = b.root
    resigned(bundles[3], keys.private, set_key("spectrum.bins", 48))
    root = tmp_path / "state"
    TrustStore(root).add(keys.public)
    Installer(ModelStore(root), TrustStore(root), GoldenGate(state_dir=root)).install(bundles[1])
    monkeypatch.setenv("OMIS_STATE_DIR", str(root))
    return {"root": root, "bundles": bundles}


def omis(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, Any, str]:
    code = main([*argv, "--json"])
    out, err = capsys.readouterr()
    return code, json.loads(out) if out.strip() else None, err


def test_install_status_promote_and_a_refused_candidate(
    state: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    root, bundles = state["root"], state["bundles"]
    code, body, err = omis(capsys, "ota", "shadow", "install", str(bundles[3]))
    assert code != 0 and body is None
    assert "the shadow runs on the same spectrum" in err and err.strip().count("\n") == 0, err
    assert ShadowStore(root).read() is None and ModelStore(root).read_journal() is None
    code, body, _ = omis(capsys, "ota", "shadow", "install", str(bundles[2]))
    assert code == 0 and body["version"] == 2
    assert omis(capsys, "ota", "shadow", "status")[1]["shadow"]["version"] == 2
    assert ModelStore(root).read_state().current.version == 1  # serving never changed
    code, body, _ = omis(capsys, "ota", "shadow", "promote")
    assert code == 0 and body["outcome"] == "committed" and body["model"]["version"] == 2
    assert omis(capsys, "ota", "shadow", "status")[1] == {"shadow": None}
    assert omis(capsys, "ota", "shadow", "clear")[1] == {"cleared": None}
    assert not [p for p in (root / "shadow").iterdir() if p.is_dir()]
