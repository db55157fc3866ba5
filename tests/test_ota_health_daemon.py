"""The health period judges the model, through the running appliance and a real mosquitto.

Each bundle here is signed and passes the whole-path golden gate, then misbehaves on real slides
(the simulated microscope's frames): its model reproduces its goldens but outputs NaN,
non-probabilities or an uncertain 0.5/0.5 for every other input
(:func:`fakes.bundles.golden_only_model`).  The health period must roll such a bundle back, and
a hardware fault during the period must neither commit nor roll back: the period starts over
and ``ota/state`` names the fault.
"""

from __future__ import annotations

import contextlib
import threading
import time
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

from deploy.appliance.base import ScanRequest
from deploy.appliance.ota import OtaSettings
from deploy.appliance.service import Appliance
from deploy.broker import find_mosquitto, parse_broker_url
from deploy.config import load_config
from deploy.ota import GoldenGate, HealthPolicy, Installer, ModelStore, TrustStore
from deploy.ota.delivery import PathSource, make_offer
from deploy.ota.exceptions import DeliveryError
from deploy.ota.sender import OfferSender
from deploy.ota.signing import generate_keypair, sign_bundle
from deploy.scanner import MicroscopeScanner
from deploy.schemas import validate
from firmware_bridge.microscope import SimMicroscope

pytestmark = pytest.mark.skipif(find_mosquitto() is None, reason="mosquitto is not installed")

DEVICE = "health1"
BASE = f"omis/v1/{DEVICE}"
NAN = float("nan")
# Only slides decide: 2 good ones commit; the time limit is out of reach of these tests.
SLIDES_DECIDE = HealthPolicy(slides=2, seconds=600.0, check_interval_s=0.1)
# What each bundle was validated at (training.operating_point): the health period's baselines.
VALIDATED = {
    "abstain": {
        "operating_point": {"referral_rate": 0.05, "slides": 100, "no_usable_field_rate": 0.0}
    },
    "abstain-validated": {
        "operating_point": {"referral_rate": 0.5, "slides": 100, "no_usable_field_rate": 0.0}
    },
}
# Passes its own golden fields (focus about 0.18) but not the simulated microscope's (0.10-0.14).
QC = {"qc-strict": {"min_focus": 0.15}}
BROKEN = {
    "nan": ([NAN, NAN], "non-finite"),
    "not-probabilities": ([0.9, 0.9], "sum to 1.8"),
    "negative": ([-0.5, 1.5], "[0, 1]"),
}


@pytest.fixture(scope="module")
def kit(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A trusted key, a good v1 and v2, and one v2 per misbehaviour (all signed)."""
    d = tmp_path_factory.mktemp("ota-health")
    keys = generate_keypair(d / "keys", "fleet")
    out: dict[str, Any] = {"pub": keys.public}
    variants: dict[str, list[float] | None] = {
        "v1": None,
        "v2": None,
        "abstain": [0.5, 0.5],
        "abstain-validated": [0.5, 0.5],
        "qc-strict": None,
    }
    variants.update({name: values for name, (values, _) in BROKEN.items()})
    for name, off_golden in variants.items():
        version = 1 if name == "v1" else 2
        bundle = make_bundle(
            d / name,
            seed=version,
            version=version,
            off_golden=off_golden,
            training=VALIDATED.get(name),
            qc=QC.get(name),
        )
        sign_bundle(bundle.root, keys.private)
        out[name] = bundle.root
        out[f"sha-{name}"] = bundle.model_sha256
    return out


def _state_with_v1(tmp_path: Path, kit: dict[str, Any]) -> Path:
    state = tmp_path / "state"
    TrustStore(state).add(kit["pub"])
    Installer(ModelStore(state), TrustStore(state), GoldenGate(state_dir=state)).install(kit["v1"])
    return state


@contextlib.contextmanager
def running(broker: Mosquitto, state: Path) -> Iterator[tuple[Appliance, MicroscopeScanner]]:
    """An in-process appliance (real scanner on ``sim://``) serving the model store."""
    config = app_config(
        broker.url, DEVICE, scan={"microscope": "sim://", "fields": 2, "scan_on_insert": False}
    )
    settings = OtaSettings(health=SLIDES_DECIDE, significance=0.01, transfer_timeout_s=20.0)
    scanner = MicroscopeScanner("sim://", None, state, sim_size=(64, 48))
    app = Appliance(load_config(environ={}, overrides=config), state, scanner, settings)
    app.start()
    loop = threading.Thread(target=app.run, daemon=True)
    loop.start()
    try:
        wait_appliance_ready(broker.port, app)
        yield app, scanner
    finally:
        app.request_stop()
        loop.join(10)
        app.shutdown()


def _offer(broker: Mosquitto, bundle: Path, cid: str) -> None:
    offer = make_offer(bundle, PathSource(path=str(bundle)), cid)
    with OfferSender(parse_broker_url(broker.url), "omis/v1", DEVICE) as sender:
        sender.connect()
        reply = sender.deliver(offer, None, wait_s=20)
    assert reply.ok is True, reply


def _states(col: Collector) -> list[dict[str, Any]]:
    return col.json_on("/ota/state")


def _progress(col: Collector) -> dict[str, Any]:
    states = _states(col)
    return (states[-1].get("progress") or {}) if states else {}


def _outcome(col: Collector) -> tuple[str | None, int | None]:
    """(last outcome, current version) once no install is in progress."""
    states = _states(col)
    if not states or states[-1].get("progress") is not None:
        return None, None
    return (states[-1].get("last_outcome") or {}).get("result"), states[-1].get("current")


def _in_health(col: Collector) -> bool:
    return _progress(col).get("step") == "health"


def _scan(app: Appliance, col: Collector, slide: str) -> dict[str, Any]:
    """Scan ``slide`` and return its published result."""
    app.submit(ScanRequest(slide, 2))
    found: list[dict[str, Any]] = []

    def published() -> bool:
        found[:] = [r for r in col.unique_results().values() if r["slide_id"] == slide]
        return bool(found)

    assert wait_until(published, 30), slide
    return found[0]


def _still_on_probation(state: Path, col: Collector) -> None:
    """Neither committed nor rolled back: the new model still serves, pending."""
    time.sleep(0.5)  # the installer wakes on every slide; give a wrong verdict time to land
    st = ModelStore(state).state()
    assert (st["current"], st["pending"]) == (2, 2), st
    assert _in_health(col), _states(col)[-1]


@pytest.mark.parametrize("kind", sorted(BROKEN))
def test_outputs_that_break_on_real_slides_roll_back(
    mosquitto: Mosquitto, tmp_path: Path, kit: dict[str, Any], kind: str
) -> None:
    state = _state_with_v1(tmp_path, kit)
    with (
        Collector(mosquitto.port, f"{BASE}/#") as col,
        running(mosquitto, state) as (app, _),
    ):
        _offer(mosquitto, kit[kind], f"c-{kind}")  # the golden gate let it through
        assert wait_until(lambda: _in_health(col), 15), _states(col)[-1:]
        bad = _scan(app, col, "B1")
        assert wait_until(lambda: _outcome(col) == ("rolled_back", 1), 30), _states(col)[-1]
        after = _scan(app, col, "B2")
    assert (bad["outcome"], bad["stage"]) == ("failed", "infer"), bad
    assert bad["model"]["sha256"] == kit[f"sha-{kind}"] and bad["prediction"]["label"] is None
    assert BROKEN[kind][1] in bad["reason"]
    last = _states(col)[-1]["last_outcome"]
    assert last["version"] == 2 and "slide B1" in last["reason"], last
    assert BROKEN[kind][1] in last["reason"]
    # v1 serves again and decides (classified or, as its band says, abstained): never failed.
    assert after["outcome"] != "failed" and after["model"]["sha256"] == kit["sha-v1"], after
    for msg in _states(col):
        validate("ota_state", msg)
    st = ModelStore(state).state()
    assert (st["current"], st["pending"]) == (1, None)


def test_referring_far_above_the_validated_rate_rolls_back(
    mosquitto: Mosquitto, tmp_path: Path, kit: dict[str, Any]
) -> None:
    state = _state_with_v1(tmp_path, kit)
    with (
        Collector(mosquitto.port, f"{BASE}/#") as col,
        running(mosquitto, state) as (app, _),
    ):
        _offer(mosquitto, kit["abstain"], "c-abstain")
        assert wait_until(lambda: _in_health(col), 15), _states(col)[-1:]
        first = _scan(app, col, "A1")
        _still_on_probation(state, col)  # one referral at a 5 % rate is no evidence
        second = _scan(app, col, "A2")
        assert wait_until(lambda: _outcome(col) == ("rolled_back", 1), 30), _states(col)[-1]
    for result in (first, second):
        assert result["outcome"] == "abstained", result
        assert result["reason"] == "uncertain_probability"
        assert result["model"]["sha256"] == kit["sha-abstain"]
    last = _states(col)[-1]["last_outcome"]
    assert "referred on 2 of 2 slides" in last["reason"] and "5.0%" in last["reason"], last
    assert "slide A2" in last["reason"]
    assert ModelStore(state).state()["current"] == 1


def test_referring_at_the_validated_rate_commits(
    mosquitto: Mosquitto, tmp_path: Path, kit: dict[str, Any]
) -> None:
    """A model validated to refer half the slides refers two in a row: expected, not a fault
    (a fixed cap on abstentions rolled such healthy updates back by chance)."""
    state = _state_with_v1(tmp_path, kit)
    with (
        Collector(mosquitto.port, f"{BASE}/#") as col,
        running(mosquitto, state) as (app, _),
    ):
        _offer(mosquitto, kit["abstain-validated"], "c-validated")
        assert wait_until(lambda: _in_health(col), 15), _states(col)[-1:]
        results = [_scan(app, col, slide) for slide in ("R1", "R2")]
        assert wait_until(lambda: _outcome(col) == ("committed", 2), 30), _states(col)[-1]
    assert [r["outcome"] for r in results] == ["abstained", "abstained"], results
    assert ModelStore(state).state()["current"] == 2


def test_a_bundle_whose_qc_rejects_real_fields_rolls_back(
    mosquitto: Mosquitto, tmp_path: Path, kit: dict[str, Any]
) -> None:
    """The bundle changed QC so that no field of a real slide passes: every slide is
    ``no_usable_field`` and the model is never consulted.  That jump is the bundle's fault."""
    state = _state_with_v1(tmp_path, kit)
    with (
        Collector(mosquitto.port, f"{BASE}/#") as col,
        running(mosquitto, state) as (app, _),
    ):
        _offer(mosquitto, kit["qc-strict"], "c-qc")
        assert wait_until(lambda: _in_health(col), 15), _states(col)[-1:]
        results = [_scan(app, col, slide) for slide in ("Q1", "Q2")]
        assert wait_until(lambda: _outcome(col) == ("rolled_back", 1), 30), _states(col)[-1]
    for r in results:
        assert (r["outcome"], r["reason"]) == ("abstained", "no_usable_field"), r
    last = _states(col)[-1]["last_outcome"]
    assert "no usable field on 2 of 2 slides" in last["reason"], last
    assert ModelStore(state).state()["current"] == 1


class Overheat:
    """The LEDs overheat: the firmware latches a fault and refuses illumination."""

    message = "FAULT_ACTIVE"

    def __init__(self, scope: SimMicroscope) -> None:
        self.scope = scope

    def inject(self) -> None:
        self.scope.firmware.set_temperature(75.0)

    def repair(self) -> None:
        self.scope.firmware.set_temperature(30.0)
        self.scope.controller.clear_fault()


class CameraStall(Overheat):
    """The camera cannot deliver a frame within the acquisition's capture timeout."""

    message = "timeout"

    def inject(self) -> None:
        self.exposure_ms = self.scope.synthetic_camera.exposure_ms
        self.scope.synthetic_camera.exposure_ms = 60_000.0

    def repair(self) -> None:
        self.scope.synthetic_camera.exposure_ms = self.exposure_ms


@pytest.mark.parametrize("fault", [Overheat, CameraStall], ids=["firmware", "camera"])
def test_hardware_fault_extends_the_period_and_is_named(
    mosquitto: Mosquitto, tmp_path: Path, kit: dict[str, Any], fault: type[Overheat]
) -> None:
    state = _state_with_v1(tmp_path, kit)
    with (
        contextlib.ExitStack() as stack,
        Collector(mosquitto.port, f"{BASE}/#") as col,
        running(mosquitto, state) as (app, scanner),
    ):
        scope = scanner._microscope
        assert isinstance(scope, SimMicroscope)
        hardware = fault(scope)
        offer = make_offer(kit["v2"], PathSource(path=str(kit["v2"])), "c-hardware")
        sender = stack.enter_context(
            OfferSender(parse_broker_url(mosquitto.url), "omis/v1", DEVICE)
        )
        sender.connect()
        assert sender.deliver(offer, None, wait_s=20).ok is True
        assert wait_until(lambda: _in_health(col), 15), _states(col)[-1:]
        assert _scan(app, col, "G1")["outcome"] == "classified"
        hardware.inject()
        failed = _scan(app, col, "H1")
        assert wait_until(lambda: "hardware_fault" in _progress(col), 10), _states(col)[-1]
        _still_on_probation(state, col)
        # omis ota publish --wait, run out of time now, says why the period goes on.
        with pytest.raises(DeliveryError, match=r"extended by a hardware fault \(slide H1"):
            sender.outcome(offer, 1.0)
        hardware.repair()
        # The period started over: one good slide since the fault is not enough ...
        assert _scan(app, col, "G2")["outcome"] == "classified"
        _still_on_probation(state, col)
        # ... two are.
        assert _scan(app, col, "G3")["outcome"] == "classified"
        assert wait_until(lambda: _outcome(col) == ("committed", 2), 30), _states(col)[-1]
    assert (failed["outcome"], failed["stage"]) == ("failed", "acquire"), failed
    named = [s["progress"] for s in _states(col) if "hardware_fault" in (s.get("progress") or {})]
    assert named[0]["extended"] is True and named[0]["version"] == 2
    assert "slide H1" in named[0]["hardware_fault"]
    assert hardware.message in named[0]["hardware_fault"]
    for msg in _states(col):
        validate("ota_state", msg)
    st = ModelStore(state).state()
    assert (st["current"], st["previous"], st["pending"]) == (2, 1, None)


def test_slides_without_a_usable_field_say_nothing_about_the_model(
    mosquitto: Mosquitto, tmp_path: Path, kit: dict[str, Any]
) -> None:
    """Quality control rejects every field before the model runs (a dark camera, an empty
    slide): the abstentions are not the bundle's, so they neither count nor roll back."""
    state = _state_with_v1(tmp_path, kit)
    with (
        Collector(mosquitto.port, f"{BASE}/#") as col,
        running(mosquitto, state) as (app, scanner),
    ):
        scope = scanner._microscope
        assert isinstance(scope, SimMicroscope)
        _offer(mosquitto, kit["v2"], "c-dark")
        assert wait_until(lambda: _in_health(col), 15), _states(col)[-1:]
        gain, scope.synthetic_camera.gain = scope.synthetic_camera.gain, 1e-3  # black frames
        dark = [_scan(app, col, slide) for slide in ("D1", "D2", "D3")]
        _still_on_probation(state, col)
        scope.synthetic_camera.gain = gain
        assert _scan(app, col, "G1")["outcome"] == "classified"
        assert _scan(app, col, "G2")["outcome"] == "classified"
        assert wait_until(lambda: _outcome(col) == ("committed", 2), 30), _states(col)[-1]
    for result in dark:
        assert (result["outcome"], result["reason"]) == ("abstained", "no_usable_field"), result
    assert ModelStore(state).state()["current"] == 2
