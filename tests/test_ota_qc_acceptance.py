"""Install refuses a bundle whose QC thresholds reject its own golden fields (issue 21 item 5).

A re-signed bundle with ``qc.min_focus: 0.9`` passed the golden gate (the gate never applied
QC), committed, and the device never classified again: every slide ``no_usable_field``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from ota_support import install_cli, make_bundle, make_keys, resigned, set_key

from deploy.ota import Installer, ModelStore, TrustStore
from deploy.ota.exceptions import RejectedError
from inference.bundle import load_bundle
from inference.qc_acceptance import QCAcceptanceError, check_qc_acceptance


@pytest.fixture
def signed(tmp_path: Path) -> tuple[Path, Path, Path]:
    """(state dir with the signer trusted, private key, a good signed v1)."""
    priv, pub = make_keys(tmp_path / "keys")
    state = tmp_path / "state"
    TrustStore(state).add(pub)
    return state, priv, make_bundle(tmp_path / "v1", 1, key=priv)


def test_a_bundle_whose_qc_rejects_its_golden_fields_is_refused(
    signed: tuple[Path, Path, Path],
) -> None:
    state, priv, bundle = signed
    resigned(bundle, priv, set_key("qc", {"min_focus": 0.9}))
    with pytest.raises(QCAcceptanceError, match="reject 2 of its 2 golden"):
        check_qc_acceptance(load_bundle(bundle))
    proc = install_cli(state, bundle)
    assert proc.returncode != 0
    assert "golden field" in proc.stderr and "focus" in proc.stderr, proc.stderr
    st = ModelStore(state).state()
    assert st["current"] is None and st["last_outcome"]["result"] == "rejected", st


def test_training_acceptance_below_the_floor_is_refused(signed: tuple[Path, Path, Path]) -> None:
    state, priv, bundle = signed
    op = {"referral_rate": 0.1, "slides": 50, "no_usable_field_rate": 0.6, "field_acceptance": 0.3}
    resigned(bundle, priv, set_key("training", {"operating_point": op}))
    installer = Installer(ModelStore(state), TrustStore(state), lambda b: None)
    with pytest.raises(RejectedError, match=r"30\.0% of its training fields"):
        installer.install(bundle)


def test_a_bundle_whose_qc_accepts_its_fields_installs(signed: tuple[Path, Path, Path]) -> None:
    state, _, bundle = signed
    check_qc_acceptance(load_bundle(bundle))
    Installer(ModelStore(state), TrustStore(state), lambda b: None).install(bundle)
    assert ModelStore(state).state()["current"] == 1
