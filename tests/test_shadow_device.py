"""Shadow mode on a running appliance: real mosquitto, the real scanner on ``sim://``.

A candidate offered with ``mode: shadow`` passes the golden gate beside the serving model, is
held across a restart, classifies every slide's spectrum (no second acquisition) and publishes
``omis.shadow/1`` on ``.../shadow`` while the serving results stay exactly what they were; a
``mode: promote`` offer then installs it through the normal health period.  A candidate with
other spectrum parameters, or one failing its gate, is refused with nothing left behind.
"""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from broker_support import (
    Collector,
    Mosquitto,
    app_config,
    mosquitto_fixture,  # noqa: F401 - the "mosquitto" fixture
    wait_appliance_ready,
    wait_until,
)
from fakes.bundles import make_bundle
from ota_support import resigned, set_key

from deploy.appliance.base import ScanRequest
from deploy.appliance.ota import OtaSettings
from deploy.appliance.service import Appliance
from deploy.broker import find_mosquitto, parse_broker_url
from deploy.config import load_config
from deploy.ota import GoldenGate, HealthPolicy, Installer, ModelStore, TrustStore
from deploy.ota.delivery import OtaOffer, PathSource, make_offer
from deploy.ota.sender import OfferSender
from deploy.ota.shadow import ShadowStore
from deploy.ota.signing import generate_keypair, sign_bundle
from deploy.scanner import MicroscopeScanner
from deploy.schemas import validate

pytestmark = pytest.mark.skipif(find_mosquitto() is None, reason="mosquitto is not installed")

DEVICE = "shadow-dev"
BASE = f"omis/v1/{DEVICE}"
HEALTH = HealthPolicy(slides=2, seconds=30.0, check_interval_s=0.1)
SLIDES = ("s-1", "s-2", "s-3")


@pytest.fixture(scope="module")
def kit(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Signed tiny bundles: v1 (serves), v2 (candidate), v3 other spectrum, v4 bad golden."""
    d = tmp_path_factory.mktemp("shadow-kit")
    keys = generate_keypair(d / "keys", "fleet")
    out: dict[str, Any] = {"pub": keys.public}
    for version in (1, 2):
        bundle = make_bundle(d / f"v{version}", seed=version, version=version)
        sign_bundle(bundle.root, keys.private)
        out[f"v{version}"] = bundle.root
        out[f"sha{version}"] = bundle.model_sha256
    other = make_bundle(d / "v3", seed=3, version=3)
    out["v3"] = resigned(other.root, keys.private, set_key("spectrum.bins", 48))
    bad = make_bundle(d / "v4", seed=4, version=4, swap_golden_classes=True)
    sign_bundle(bad.root, keys.private)
    out["v4"] = bad.root
    return out


def _state_with_v1(tmp_path: Path, kit: dict[str, Any]) -> Path:
    state = tmp_path / "state"
    TrustStore(state).add(kit["pub"])
    Installer(ModelStore(state), TrustStore(state), GoldenGate(state_dir=state)).install(kit["v1"])
    return state


@contextlib.contextmanager
def running(broker: Mosquitto, state: Path) -> Iterator[Appliance]:
    config = app_config(
        broker.url, DEVICE, scan={"microscope": "sim://", "fields": 2, "scan_on_insert": False}
    )
    scanner = MicroscopeScanner("sim://", None, state, sim_size=(64, 48))
    settings = OtaSettings(health=HEALTH, need_after_s=0.5, transfer_timeout_s=20.0)
    app = Appliance(load_config(environ={}, overrides=config), state, scanner, settings)
    app.start()
    loop = threading.Thread(target=app.run, daemon=True)
    loop.start()
    try:
        wait_appliance_ready(broker.port, app)
        yield app
    finally:
        app.request_stop()
        loop.join(10)
        app.shutdown()


def _offer(broker: Mosquitto, bundle: Path, cid: str, mode: str) -> tuple[dict[str, Any], Any]:
    """Send an offer in ``mode``; (reply, final ota/state or None when refused)."""
    offer = make_offer(bundle, PathSource(path=str(bundle)), cid)
    offer = OtaOffer.model_validate(
        {**offer.model_dump(by_alias=True), "mode": mode}
        | ({"source": None} if mode == "promote" else {})
    )
    with OfferSender(parse_broker_url(broker.url), "omis/v1", DEVICE) as sender:
        sender.connect()
        reply = sender.deliver(offer, None, wait_s=30)
        final = sender.outcome(offer, 60) if reply.ok else None
    return reply.to_json(), final.to_json() if final is not None else None


def _scan(app: Appliance, col: Collector, slides: tuple[str, ...], total: int) -> None:
    for slide in slides:
        app.submit(ScanRequest(slide, 2))
    assert wait_until(lambda: len(col.unique_results()) >= total, 60), len(col.unique_results())


def _results(col: Collector, slides: tuple[str, ...], start: int) -> list[dict[str, Any]]:
    ordered = sorted(col.unique_results().values(), key=lambda r: r["finished_at"])
    picked = [r for r in ordered if r["slide_id"] in slides]
    return picked[start : start + len(slides)]


def _call(result: dict[str, Any]) -> tuple[Any, ...]:
    return (result["outcome"], result["prediction"], result["spectrum"]["values"])


def _status(col: Collector) -> dict[str, Any]:
    states = col.json_on("/status")
    return states[-1] if states else {}


def _state(col: Collector) -> dict[str, Any]:
    states = col.json_on("/ota/state")
    return states[-1] if states else {}


def test_a_shadow_candidate_is_compared_on_every_slide_then_promoted(
    mosquitto: Mosquitto, tmp_path: Path, kit: dict[str, Any]
) -> None:
    state = _state_with_v1(tmp_path, kit)
    with Collector(mosquitto.port, f"{BASE}/#") as col:
        with running(mosquitto, state) as app:
            assert wait_until(lambda: _state(col).get("current") == 1, 10)
            _scan(app, col, SLIDES, 3)  # the serving calls before any shadow
            reply, final = _offer(mosquitto, kit["v2"], "shadow-1", "shadow")
            assert reply["ok"] is True, reply
            assert final["last_outcome"]["result"] == "shadow", final
            assert wait_until(lambda: (_state(col).get("shadow") or {}).get("version") == 2, 10)
            assert _state(col)["current"] == 1  # the serving model never changed
            assert wait_until(lambda: (_status(col).get("shadow") or {}).get("version") == 2, 10)
            assert _status(col)["model"]["version"] == 1
        # The candidate is held across a restart and runs from the first slide.
        with running(mosquitto, state) as app:
            assert wait_until(lambda: (_state(col).get("shadow") or {}).get("version") == 2, 10)
            _scan(app, col, SLIDES, 6)
            assert wait_until(lambda: len(col.json_on("/shadow")) == 3, 20)
            shadows = col.json_on("/shadow")
            before, after = _results(col, SLIDES, 0), _results(col, SLIDES, 3)
            # Serving results are the same calls on the same spectra with or without a shadow.
            assert [_call(r) for r in before] == [_call(r) for r in after]
            assert all(r["model"]["version"] == 1 for r in after)
            by_result = {s["serving_message_id"]: s for s in shadows}
            assert set(by_result) == {r["message_id"] for r in after}
            for shadow in shadows:
                validate("shadow", shadow)
                assert shadow["candidate"] == {"name": "tiny", "version": 2, "sha256": kit["sha2"]}
                assert shadow["serving"]["version"] == 1
                assert shadow["device_id"] == DEVICE
            # Promotion: the normal path (switch, health period of 2 slides, commit).
            reply, _ = _offer(mosquitto, kit["v2"], "promote-1", "promote")
            assert reply["ok"] is True, reply
            assert wait_until(
                lambda: any(
                    (s.get("progress") or {}).get("step") == "health"
                    for s in col.json_on("/ota/state")
                ),
                30,
            )
            _scan(app, col, SLIDES, 9)
            assert wait_until(
                lambda: (
                    (_state(col).get("last_outcome") or {}).get("result") == "committed"
                    and _state(col).get("progress") is None
                ),
                30,
            ), _state(col)
            assert _state(col)["current"] == 2 and _state(col)["shadow"] is None
            assert wait_until(lambda: _status(col).get("shadow", 0) is None, 10)
            promoted = _results(col, SLIDES, 6)
    # The shadow's calls are exactly what the candidate says once it serves the same slides.
    shadow_calls = {s["slide_id"]: s["prediction"] for s in shadows}
    assert {r["slide_id"]: r["prediction"] for r in promoted} == shadow_calls
    assert all(r["model"]["version"] == 2 for r in promoted)
    assert ShadowStore(state).read() is None


@pytest.mark.parametrize(
    ("bundle", "expected"),
    [("v3", "the shadow runs on the same spectrum"), ("v4", "golden")],
)
def test_a_refused_shadow_candidate_leaves_nothing_behind(
    mosquitto: Mosquitto, tmp_path: Path, kit: dict[str, Any], bundle: str, expected: str
) -> None:
    state = _state_with_v1(tmp_path, kit)
    store = ModelStore(state)
    bundles_before = sorted(p.name for p in (store.root / "bundles").iterdir())
    with Collector(mosquitto.port, f"{BASE}/#") as col, running(mosquitto, state) as app:
        assert wait_until(lambda: _state(col).get("current") == 1, 10)
        reply, final = _offer(mosquitto, kit[bundle], f"refused-{bundle}", "shadow")
        said = json.dumps(final if reply.get("ok") else reply)
        assert expected in said, said
        assert "\n" not in (final or {}).get("last_outcome", {}).get("reason", "")
        _scan(app, col, ("after",), 1)
        assert col.json_on("/shadow") == []
        assert _state(col)["shadow"] is None and _state(col)["current"] == 1
    assert ShadowStore(state).read() is None
    assert sorted(p.name for p in (store.root / "bundles").iterdir()) == bundles_before
    assert store.read_journal() is None
