"""OTA through the running appliance: a real mosquitto, the real MicroscopeScanner on ``sim://``.

Each test starts an in-process :class:`Appliance` (scan loop, OTA worker, MQTT link) on a free
mosquitto port with tiny 32x32 bundles (render size = input size) and small simulated frames,
then offers bundles over MQTT with ``omis ota publish`` or the sender API.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
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
from fakes.bundles import make_bundle, make_field

from deploy.appliance.base import ScannerInfo, ScanRequest
from deploy.appliance.ota import OtaSettings, offer_json_schema
from deploy.appliance.service import Appliance
from deploy.broker import find_mosquitto, parse_broker_url
from deploy.config import load_config
from deploy.ota import GoldenGate, HealthPolicy, Installer, ModelStore, TrustStore
from deploy.ota.delivery import PathSource, inline_source, make_offer
from deploy.ota.sender import OfferSender
from deploy.ota.signing import generate_keypair, sign_bundle
from deploy.ota.unpack import pack_bundle
from deploy.scanner import MicroscopeScanner
from deploy.schemas import load_schema, validate
from firmware_bridge.images import write_png
from inference.bundle import Bundle

pytestmark = pytest.mark.skipif(find_mosquitto() is None, reason="mosquitto is not installed")

DEVICE = "dev1"
BASE = f"omis/v1/{DEVICE}"
SIM_FRAMES = (64, 48)
# Commit after 2 good slides on the new model, or 3 s of passing checks.
FAST_HEALTH = HealthPolicy(slides=2, seconds=3.0, check_interval_s=0.1)


@pytest.fixture(scope="module")
def kit(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Signed tiny bundles v1..v3 (directories and .tar), and one signed by an untrusted key."""
    d = tmp_path_factory.mktemp("ota-daemon")
    trusted = generate_keypair(d / "keys", "fleet")
    rogue = generate_keypair(d / "keys", "rogue")
    out: dict[str, Any] = {"pub": trusted.public}
    for version in (1, 2, 3):
        bundle = make_bundle(d / f"v{version}", seed=version, version=version)
        sign_bundle(bundle.root, trusted.private)
        out[f"v{version}"] = bundle.root
        out[f"v{version}.tar"] = pack_bundle(bundle.root, d / f"v{version}.tar")
        out[f"sha{version}"] = bundle.model_sha256
    forged = make_bundle(d / "forged", seed=9, version=5)
    sign_bundle(forged.root, rogue.private)
    out["forged"] = forged.root
    return out


class RecordingScanner(MicroscopeScanner):
    """The real scanner, logging when slides start/end and when models are switched."""

    def __init__(self, state_dir: Path) -> None:
        super().__init__("sim://", None, state_dir, sim_size=SIM_FRAMES)
        self.events: list[tuple[str, str]] = []  # ("start"|"end"|"load", model sha256)
        self._events_lock = threading.Lock()

    def _log(self, kind: str) -> None:
        with self._events_lock:
            self.events.append((kind, str((self.model or {}).get("sha256"))))

    def scan(self, request: ScanRequest, cancel: threading.Event) -> dict[str, Any]:
        self._log("start")
        try:
            return super().scan(request, cancel)
        finally:
            self._log("end")

    def load_model(self, bundle: Bundle, generation: int | None) -> ScannerInfo:
        info = super().load_model(bundle, generation)
        self._log("load")
        return info


def _state_with_v1(tmp_path: Path, kit: dict[str, Any]) -> Path:
    state = tmp_path / "state"
    TrustStore(state).add(kit["pub"])
    Installer(ModelStore(state), TrustStore(state), GoldenGate(state_dir=state)).install(kit["v1"])
    return state


@contextlib.contextmanager
def running(
    broker: Mosquitto, state: Path, settings: OtaSettings
) -> Iterator[tuple[Appliance, RecordingScanner]]:
    """An in-process appliance serving the model store, its supervision loop on a thread."""
    config = app_config(
        broker.url, DEVICE, scan={"microscope": "sim://", "fields": 2, "scan_on_insert": False}
    )
    scanner = RecordingScanner(state)
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


def _settings(**kw: Any) -> OtaSettings:
    return OtaSettings(health=FAST_HEALTH, need_after_s=0.5, transfer_timeout_s=20.0, **kw)


def _submit(app: Appliance, *slides: str) -> None:
    for slide in slides:
        app.submit(ScanRequest(slide, 2))


def _last_state(col: Collector) -> dict[str, Any]:
    states = col.json_on("/ota/state")
    return states[-1] if states else {}


def _outcome(col: Collector) -> tuple[str | None, int | None]:
    """(last outcome, current version) once no install is in progress."""
    st = _last_state(col)
    last = st.get("last_outcome") or {}
    return (last.get("result"), st.get("current")) if st.get("progress") is None else (None, None)


def _switched(col: Collector, version: int) -> bool:
    """The new model serves: its health period has begun."""
    return any(
        (s.get("progress") or {}).get("step") == "health" and s["progress"]["version"] == version
        for s in col.json_on("/ota/state")
    )


def _offer_path(broker: Mosquitto, bundle: Path, cid: str) -> dict[str, Any]:
    offer = make_offer(bundle, PathSource(path=str(bundle)), cid)
    with OfferSender(parse_broker_url(broker.url), "omis/v1", DEVICE) as sender:
        sender.connect()
        return sender.deliver(offer, None, wait_s=20).to_json()


def _by_seq(col: Collector) -> list[dict[str, Any]]:
    return sorted(col.unique_results().values(), key=lambda r: r["seq"])


# -- tests ------------------------------------------------------------------------------------


def test_offer_schema_is_generated_from_the_offer_model() -> None:
    assert load_schema("cmd_ota") == offer_json_schema()


def test_every_reader_finds_the_store_active_model(tmp_path: Path, kit: dict[str, Any]) -> None:
    from deploy.scanner import active_bundle_path as deploy_reader
    from inference.cli_device import active_bundle_path as infer_reader

    state = _state_with_v1(tmp_path, kit)
    store = ModelStore(state)
    current = store.read_state().current
    assert current is not None
    expected = store.bundle_path(current)
    assert deploy_reader(state) == infer_reader(state) == expected
    assert (expected / "manifest.json").read_bytes() == (kit["v1"] / "manifest.json").read_bytes()
    # omis infer without --bundle classifies with that model.
    w, p = make_field(3)
    write_png(tmp_path / "w.png", w)
    write_png(tmp_path / "p.png", p)
    done = subprocess.run(
        [
            *(sys.executable, "-m", "deploy.cli", "infer"),
            *(str(tmp_path / "w.png"), str(tmp_path / "p.png")),
            *("--json", "--state-dir", str(state)),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout)["model"]["sha256"] == kit["sha1"]


def test_inline_update_with_omis_ota_publish_takes_over_between_slides(
    mosquitto: Mosquitto, tmp_path: Path, kit: dict[str, Any]
) -> None:
    state = _state_with_v1(tmp_path, kit)
    with (
        Collector(mosquitto.port, f"{BASE}/#") as col,
        running(mosquitto, state, _settings()) as (app, _),
    ):
        assert wait_until(lambda: _last_state(col).get("current") == 1, 10)
        _submit(app, "before-1")
        assert wait_until(lambda: len(col.unique_results()) == 1, 20)
        publish = subprocess.run(
            [
                *(sys.executable, "-m", "deploy.cli"),
                *("ota", "publish", "-v", str(kit["v2.tar"]), "--broker", mosquitto.url),
                *("--device-id", DEVICE, "--inline", "--chunk-kib", "8", "--wait", "30"),
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        # publish waits for the final outcome: committed here, after 3 s of passing checks.
        assert publish.returncode == 0, publish.stderr[-2000:]
        out = json.loads(publish.stdout)
        assert out["outcome"] == "committed" and out["version"] == 2
        steps = [
            line.split("step: ", 1)[1] for line in publish.stderr.splitlines() if "step: " in line
        ]
        for expected in ("connected", "is present", "published", "sent", "reply", "committed"):
            assert any(expected in step for step in steps), steps
        reply = out["reply"]
        assert reply["ok"] is True and reply["result"]["received"] is True
        assert reply["result"]["version"] == 2
        assert wait_until(lambda: _switched(col, 2), 20), _last_state(col)
        _submit(app, "after-1", "after-2", "after-3")
        assert wait_until(lambda: _outcome(col) == ("committed", 2), 30), _last_state(col)
        assert wait_until(lambda: len(col.unique_results()) == 4, 20), [
            (r["slide_id"], r["source"], r["seq"]) for r in _by_seq(col)
        ]
        assert wait_until(lambda: app.publish_status()["model"]["version"] == 2, 5)
    results = _by_seq(col)
    assert [r["slide_id"] for r in results] == ["before-1", "after-1", "after-2", "after-3"]
    assert results[0]["model"]["sha256"] == kit["sha1"]
    assert all(
        r["model"] == {"name": "tiny", "version": 2, "sha256": kit["sha2"]} for r in results[1:]
    )
    for state_msg in col.json_on("/ota/state"):
        validate("ota_state", state_msg)
    steps = [s["progress"]["step"] for s in col.json_on("/ota/state") if s.get("progress")]
    for step in ("offered", "receiving", "received", "checked", "switched", "health", "committed"):
        assert step in steps
    assert "updating" in {s["state"] for s in col.json_on("/status")}
    validate("reply", reply)
    final = ModelStore(state).state()
    assert (final["current"], final["previous"], final["pending"]) == (2, 1, None)


def test_update_during_a_multi_slide_scan_loses_nothing(
    mosquitto: Mosquitto, tmp_path: Path, kit: dict[str, Any]
) -> None:
    state = _state_with_v1(tmp_path, kit)
    slides = [f"M{i}" for i in range(8)]
    with (
        Collector(mosquitto.port, f"{BASE}/#") as col,
        running(mosquitto, state, _settings()) as (app, scanner),
    ):
        _submit(app, *slides)
        assert wait_until(lambda: len(col.unique_results()) >= 1, 20)  # mid-scan now
        src = inline_source(kit["v2.tar"], "mid-scan-0001", chunk_size=4096)
        offer = make_offer(kit["v2.tar"], src, "c-mid-scan")
        with OfferSender(parse_broker_url(mosquitto.url), "omis/v1", DEVICE) as sender:
            sender.connect()
            reply = sender.deliver(offer, kit["v2.tar"], wait_s=30)
        assert reply.ok is True, reply
        assert wait_until(lambda: len(col.unique_results()) == len(slides), 40)
        assert wait_until(lambda: _outcome(col) == ("committed", 2), 30), _last_state(col)
    results = _by_seq(col)
    assert [r["slide_id"] for r in results] == slides  # none lost, in order
    assert [r["seq"] for r in results] == list(range(1, len(slides) + 1))
    shas = [r["model"]["sha256"] for r in results]
    assert shas[0] == kit["sha1"] and shas[-1] == kit["sha2"]  # the switch came mid-scan
    first_v2 = shas.index(kit["sha2"])
    assert shas == [kit["sha1"]] * first_v2 + [kit["sha2"]] * (len(shas) - first_v2)
    # The switch never falls inside a slide, and each result names the model its slide began on.
    events = scanner.events
    in_slide = False
    starts: list[str] = []
    for kind, sha in events:
        if kind == "start":
            in_slide = True
            starts.append(sha)
        elif kind == "end":
            in_slide = False
        else:
            assert not in_slide, events
    assert [e for e in events if e[0] == "load"] == [("load", kit["sha2"])]
    assert starts == shas


def test_rejected_offers_are_answered_and_change_nothing(
    mosquitto: Mosquitto, tmp_path: Path, kit: dict[str, Any]
) -> None:
    state = _state_with_v1(tmp_path, kit)
    with (
        Collector(mosquitto.port, f"{BASE}/#") as col,
        running(mosquitto, state, _settings()) as (app, _),
    ):
        forged = _offer_path(mosquitto, kit["forged"], "c-forged")
        replay = _offer_path(mosquitto, kit["v1"], "c-replay")
        _submit(app, "after-rejects")
        assert wait_until(lambda: len(col.unique_results()) == 1, 20)
    for reply, cid in ((forged, "c-forged"), (replay, "c-replay")):
        validate("reply", reply)
        assert reply["ok"] is False and reply["correlation_id"] == cid
        assert reply["error"]["code"] == "rejected"
    assert "signature" in forged["error"]["message"]
    assert "already installed" in replay["error"]["message"]
    assert ModelStore(state).state()["current"] == 1
    assert _by_seq(col)[0]["model"]["sha256"] == kit["sha1"]
    assert _last_state(col)["current"] == 1


def test_failed_health_check_rolls_back_automatically(
    mosquitto: Mosquitto, tmp_path: Path, kit: dict[str, Any]
) -> None:
    state = _state_with_v1(tmp_path, kit)
    calls: list[str] = []

    def firmware_handshake() -> None:
        calls.append(str(ModelStore(state).read_state().current.version))  # type: ignore[union-attr]
        raise RuntimeError("firmware handshake failed: no answer")

    with (
        Collector(mosquitto.port, f"{BASE}/#") as col,
        running(mosquitto, state, _settings(checks=[firmware_handshake])) as (app, scanner),
    ):
        reply = _offer_path(mosquitto, kit["v3"], "c-rollback")
        assert reply["ok"] is True
        assert wait_until(lambda: _outcome(col) == ("rolled_back", 1), 30), _last_state(col)
        _submit(app, "after-rollback")
        assert wait_until(lambda: len(col.unique_results()) == 1, 20)
        assert app.publish_status()["model"]["sha256"] == kit["sha1"]
    assert calls and calls[0] == "3"  # the check ran while v3 was switched in
    last = _last_state(col)["last_outcome"]
    assert last["version"] == 3 and "firmware handshake failed" in last["reason"]
    assert _by_seq(col)[0]["model"]["sha256"] == kit["sha1"]
    loads = [sha for kind, sha in scanner.events if kind == "load"]
    assert loads == [kit["sha3"], kit["sha1"]]  # switched in, then back
    st = ModelStore(state).state()
    assert (st["current"], st["pending"]) == (1, None)


class DroppingSender(OfferSender):
    """Loses chunk 1 on the first pass, as a flaky link would."""

    dropped = False

    def send_chunks(self, archive: Path, source: Any, only: set[int] | None = None) -> int:
        if only is None and not self.dropped:
            self.dropped = True
            everything = set(range(source.chunks)) - {1}
            return super().send_chunks(archive, source, everything)
        return super().send_chunks(archive, source, only)


def test_lost_chunk_is_asked_for_again(
    mosquitto: Mosquitto, tmp_path: Path, kit: dict[str, Any]
) -> None:
    state = _state_with_v1(tmp_path, kit)
    with (
        Collector(mosquitto.port, f"{BASE}/#") as col,
        running(mosquitto, state, _settings()) as (app, _),
    ):
        src = inline_source(kit["v2.tar"], "lossy-000001", chunk_size=4096)
        offer = make_offer(kit["v2.tar"], src, "c-lossy")
        sender = DroppingSender(parse_broker_url(mosquitto.url), "omis/v1", DEVICE)
        with sender:
            sender.connect()
            reply = sender.deliver(offer, kit["v2.tar"], wait_s=30)
        assert sender.dropped and reply.ok is True, reply
        assert wait_until(lambda: _switched(col, 2), 20), _last_state(col)
        _submit(app, "L1", "L2")
        assert wait_until(lambda: _outcome(col) == ("committed", 2), 30), _last_state(col)
    needs = col.json_on("/ota/need/lossy-000001")
    assert needs and needs[0]["missing"] == [1]
    assert not (state / "ota" / "chunks" / "lossy-000001").exists()  # assembled and cleaned up


def test_omis_serve_takes_an_update_from_its_model_store(
    mosquitto: Mosquitto, tmp_path: Path, kit: dict[str, Any]
) -> None:
    from broker_support import publish

    state = _state_with_v1(tmp_path, kit)
    env = {"OMIS_SERVICE__HEALTH_INTERVAL_S": "0.5", "OMIS_SCAN__SCAN_ON_INSERT": "false"}
    cmd = [sys.executable, "-m", "deploy.cli", "serve", "--microscope", "sim://"]
    cmd += ["--broker", mosquitto.url, "--device-id", DEVICE, "--fields", "2"]
    cmd += ["--state-dir", str(state)]
    import os

    with Collector(mosquitto.port, f"{BASE}/#") as col:
        proc = subprocess.Popen(
            cmd,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, **env},
        )
        try:
            assert wait_until(lambda: b"online" in col.on("/availability"), 60)
            assert wait_until(lambda: _last_state(col).get("current") == 1, 10)
            reply = _offer_path(mosquitto, kit["v2"], "c-serve")
            assert reply["ok"] is True, reply
            assert wait_until(lambda: _switched(col, 2), 20), _last_state(col)
            # The daemon's health period wants 3 good slides on the new model (a slide that
            # fails quality control says nothing about the model and does not count).
            for i in range(6):
                publish(mosquitto.port, f"{BASE}/cmd/scan", json.dumps({"slide_id": f"N{i}"}))
            assert wait_until(lambda: _outcome(col) == ("committed", 2), 60), json.dumps(
                _last_state(col)
            )
            assert wait_until(lambda: app_idle(col), 30)
        finally:
            proc.terminate()
            proc.wait(30)
    assert proc.returncode == 0, proc.stderr.read() if proc.stderr else ""
    results = col.unique_results().values()
    assert len(results) >= 3
    assert {r["model"]["sha256"] for r in results} == {kit["sha2"]}


def app_idle(col: Collector) -> bool:
    """The last status says idle with an empty queue."""
    statuses = col.json_on("/status")
    return (
        bool(statuses) and statuses[-1]["state"] == "idle" and statuses[-1]["queue"]["depth"] == 0
    )


class _CountingKey:
    """A trusted key that counts signature checks."""

    def __init__(self, key: Any, calls: list[str]) -> None:
        self.key, self.calls = key, calls

    def verify(self, signature: bytes, data: bytes) -> None:
        self.calls.append("verify")
        self.key.verify(signature, data)


def test_an_offer_is_verified_parsed_and_unpacked_once(
    mosquitto: Mosquitto, tmp_path: Path, kit: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Inline offer -> installed: one signature check, one manifest parse, one verified unpack
    (each signed file streamed to disk once, nothing extracted unchecked)."""
    import tarfile

    import deploy.ota.unpack as unpack
    from inference.bundle import Manifest

    state = _state_with_v1(tmp_path, kit)
    calls: list[str] = []
    keys = TrustStore.keys
    monkeypatch.setattr(
        TrustStore, "keys", lambda self: {f: _CountingKey(k, calls) for f, k in keys(self).items()}
    )
    validate_manifest = Manifest.model_validate.__func__  # type: ignore[attr-defined]

    def counting_validate(cls: type[Manifest], /, obj: Any, **kw: Any) -> Manifest:
        # the offered manifest (v2); the health period reads the replaced model's (v1) QC
        if isinstance(obj, dict) and obj.get("version") == 2:
            calls.append("parse")
        return validate_manifest(cls, obj, **kw)  # type: ignore[no-any-return]

    monkeypatch.setattr(Manifest, "model_validate", classmethod(counting_validate))
    stream = unpack._stream

    def counting_stream(src: Any, target: Path, *args: Any) -> None:
        calls.append(f"write {target.name}")
        stream(src, target, *args)

    monkeypatch.setattr(unpack, "_stream", counting_stream)
    extract = tarfile.TarFile.extract

    def counting_extract(self: tarfile.TarFile, *args: Any, **kw: Any) -> None:
        calls.append("unverified extract")
        extract(self, *args, **kw)

    monkeypatch.setattr(tarfile.TarFile, "extract", counting_extract)
    with (
        Collector(mosquitto.port, f"{BASE}/#") as col,
        running(mosquitto, state, _settings()) as _,
    ):
        assert wait_until(lambda: _last_state(col).get("current") == 1, 10)
        src = inline_source(kit["v2.tar"], "once-0000001", chunk_size=8192)
        offer = make_offer(kit["v2.tar"], src, "c-once")
        calls.clear()  # make_offer is the sender's side
        with OfferSender(parse_broker_url(mosquitto.url), "omis/v1", DEVICE) as sender:
            sender.connect()
            reply = sender.deliver(offer, kit["v2.tar"], wait_s=30)
        assert reply.ok is True, reply
        assert wait_until(lambda: _switched(col, 2), 20), _last_state(col)
        seen = list(calls)  # the install, up to the switch (a rollback at stop re-reads v1)
    writes = [c[len("write ") :] for c in seen if c.startswith("write ")]
    signed = [p.name for p in kit["v2"].rglob("*") if p.is_file()]
    assert seen.count("verify") == 1, seen
    assert seen.count("parse") == 1, seen
    assert "unverified extract" not in seen, seen
    assert sorted(writes) == sorted(signed), seen
