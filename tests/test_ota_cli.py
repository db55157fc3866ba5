"""The ``omis bundle`` and ``omis ota`` commands, run as real subprocesses."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from broker_support import (
    Collector,
    Mosquitto,
    mosquitto_fixture,  # noqa: F401 - the "mosquitto" fixture
    publish,
)
from ota_support import make_bundle

from deploy.broker import find_mosquitto
from deploy.messages.testing import ota_state_message, reply_message

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


def test_bundle_pack_then_ota_install(tmp_path: Path) -> None:
    r = omis("bundle", "keygen", "--out", tmp_path / "k", "--name", "fleet", "--json")
    keys = json.loads(r.stdout)
    state = tmp_path / "state"
    assert omis("ota", "trust", keys["public"], state=state).returncode == 0
    bundle = make_bundle(tmp_path / "v1", 1, key=Path(keys["private"]))
    out = tmp_path / "out" / "v1.tar"
    r = omis("bundle", "pack", bundle, out, "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["archive"] == str(out) and out.is_file()
    first = out.read_bytes()
    assert omis("bundle", "pack", bundle, out).returncode == 0
    assert out.read_bytes() == first  # reproducible: the same bundle packs to the same bytes
    r = omis("ota", "install", out, "--json", state=state)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["model"]["version"] == 1
    r = omis("bundle", "verify", out, "--pubkey", keys["public"])
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("damage", ["no_manifest", "altered_file", "extra_file", "not_a_dir"])
def test_bundle_pack_refuses_what_is_not_a_bundle(tmp_path: Path, damage: str) -> None:
    bundle = make_bundle(tmp_path / "b", 1)
    if damage == "no_manifest":
        (bundle / "manifest.json").unlink()
    elif damage == "altered_file":
        (bundle / "model.onnx").write_bytes(b"not the signed model")
    elif damage == "extra_file":
        (bundle / "notes.txt").write_text("x")
    else:
        bundle = tmp_path / "missing"
    out = tmp_path / "b.tar"
    out.write_bytes(b"previous archive")
    r = omis("bundle", "pack", bundle, out)
    assert r.returncode == 1
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    assert out.read_bytes() == b"previous archive"  # nothing half-written, nothing replaced
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".b.tar")] == []


@pytest.fixture(scope="module")
def signed_tar(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("publish")
    keys = json.loads(omis("bundle", "keygen", "--out", d / "k", "--json").stdout)
    bundle = make_bundle(d / "v2", 2, key=Path(keys["private"]))
    assert omis("bundle", "pack", bundle, d / "v2.tar").returncode == 0
    return d / "v2.tar"


@pytest.mark.skipif(find_mosquitto() is None, reason="mosquitto is not installed")
@pytest.mark.parametrize("case", ["absent", "offline", "mute"])
def test_publish_to_a_device_that_does_not_answer_fails_fast(
    mosquitto: Mosquitto, signed_tar: Path, case: str
) -> None:
    """No such device (no ota/state), an offline one, or one that never takes the offer: one
    line within seconds, and (absent, offline) not a byte sent."""
    device = f"dev-{case}"
    base = f"omis/v1/{device}"
    if case != "absent":
        state = ota_state_message(1).payload()
        publish(mosquitto.port, f"{base}/ota/state", state, retain=True)
    if case == "offline":
        publish(mosquitto.port, f"{base}/availability", b"offline", retain=True)
    with Collector(mosquitto.port, f"{base}/#") as col:
        started = time.monotonic()
        r = omis(
            "ota",
            "publish",
            "-v",
            signed_tar,
            "--broker",
            mosquitto.url,
            "--device-id",
            device,
            "--inline",
            "--chunk-kib",
            "4",
            "--answer-timeout",
            "3",
        )
        took = time.monotonic() - started
    errors = [line for line in r.stderr.splitlines() if "error:" in line]
    assert r.returncode == 1 and len(errors) == 1, r.stderr
    assert device in errors[0] and "Traceback" not in r.stderr
    assert took < 15, took
    assert "step" in r.stderr  # -v prints each transfer step
    sent = col.on("/cmd/ota") + [p for t, p, _ in col.messages if "/ota/chunk/" in t]
    if case == "mute":
        assert len(col.on("/cmd/ota")) == 1 and not any(
            "/ota/chunk/" in t for t, _, _ in col.messages
        )
        assert "did not take the offer" in errors[0]
    else:
        assert sent == []
        assert ("offline" if case == "offline" else "no ota/state") in errors[0]


class Answering:
    """A device stand-in on the broker: its retained ``ota/state`` and availability, and an
    answer (bytes made from the offer's correlation id) to every ``cmd/ota``."""

    def __init__(self, port: int, device: str, answer: Callable[[str], bytes]) -> None:
        import paho.mqtt.client as paho
        from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

        self.base = f"omis/v1/{device}"
        publish(port, f"{self.base}/ota/state", ota_state_message(1).payload(), retain=True)
        publish(port, f"{self.base}/availability", b"online", retain=True)
        self.subscribed = threading.Event()
        client = paho.Client(CallbackAPIVersion.VERSION2, protocol=MQTTProtocolVersion.MQTTv5)
        client.on_subscribe = lambda *_: self.subscribed.set()

        def on_offer(c: paho.Client, _u: Any, msg: paho.MQTTMessage) -> None:
            cid = json.loads(msg.payload)["correlation_id"]
            c.publish(f"{self.base}/cmd/ota/reply", answer(cid), 1)

        client.on_message = on_offer
        client.connect("127.0.0.1", port)
        client.subscribe(f"{self.base}/cmd/ota", 1)
        client.loop_start()
        self.client = client
        assert self.subscribed.wait(5)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def _reply(cid: str, **changes: Any) -> bytes:
    """A valid reply to offer ``cid`` with ``changes`` (None: the key left out)."""
    data = {**reply_message("ota", cid, device="dev-odd").to_json(), **changes}
    return json.dumps({k: v for k, v in data.items() if v is not None}).encode()


MALFORMED_REPLIES: dict[str, Callable[[str], bytes]] = {
    "not JSON": lambda cid: b"{not json",
    "ok not a boolean": lambda cid: _reply(cid, ok="maybe"),
    "no verb": lambda cid: _reply(cid, verb=None),
    "an error without a code": lambda cid: _reply(
        cid, ok=False, result=None, error={"message": "no"}
    ),
}  # fmt: skip


@pytest.mark.skipif(find_mosquitto() is None, reason="mosquitto is not installed")
@pytest.mark.parametrize("case", list(MALFORMED_REPLIES))
def test_publish_given_a_malformed_reply_fails_with_one_line(
    mosquitto: Mosquitto, signed_tar: Path, case: str
) -> None:
    """The reply is read with its model (omis.reply/1): one that the model refuses is one
    error line naming the reply, at once -- never taken for an answer."""
    device = "dev-odd"
    answering = Answering(mosquitto.port, device, MALFORMED_REPLIES[case])
    try:
        started = time.monotonic()
        r = omis(
            "ota", "publish", signed_tar, "--broker", mosquitto.url, "--device-id", device,
            "--url", "https://example.invalid/v2.tar", "--answer-timeout", "5", "--wait", "20",
        )  # fmt: skip
        took = time.monotonic() - started
    finally:
        answering.close()
    errors = [line for line in r.stderr.splitlines() if "error:" in line]
    assert r.returncode == 1 and len(errors) == 1, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr and r.stdout == ""
    assert "malformed reply" in errors[0] and device in errors[0], errors[0]
    assert took < 15, took
