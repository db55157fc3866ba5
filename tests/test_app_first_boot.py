"""First boot: a device with an empty model store comes up, says so, and takes its first model
over MQTT; the steps are those of docs/deploy.md ("Provisioning a fresh device")."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from broker_support import (
    Collector,
    Mosquitto,
    mosquitto_fixture,  # noqa: F401 - the "mosquitto" fixture
    publish,
    wait_until,
)
from fakes.bundles import make_bundle

from deploy.broker import find_mosquitto
from deploy.ota.signing import generate_keypair, sign_bundle
from deploy.ota.unpack import pack_bundle
from deploy.schemas import validate

pytestmark = pytest.mark.skipif(find_mosquitto() is None, reason="mosquitto is not installed")

OMIS = [sys.executable, "-m", "deploy.cli"]
DEVICE = "fresh1"
BASE = f"omis/v1/{DEVICE}"


def omis(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*OMIS, *args], check=False, capture_output=True, text=True, timeout=timeout
    )


def _replies(col: Collector, cid: str) -> list[dict[str, object]]:
    return [r for r in col.json_on("/cmd/scan/reply") if r.get("correlation_id") == cid]


def _last_status(col: Collector) -> dict[str, object]:
    """The latest status seen ({} before the first: it may follow "online" by a moment)."""
    statuses = col.json_on("/status")
    return statuses[-1] if statuses else {}


def test_a_fresh_device_comes_up_degraded_and_takes_its_first_model_over_mqtt(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    keys = generate_keypair(tmp_path / "keys", "fleet")
    bundle = make_bundle(tmp_path / "bundle", seed=1, version=1)
    sign_bundle(bundle.root, keys.private)
    archive = pack_bundle(bundle.root, tmp_path / "tiny-v1.tar")
    log = tmp_path / "serve.log"
    config = tmp_path / "omis.yaml"
    config.write_text(
        f"device:\n  id: {DEVICE}\nmqtt:\n  broker: {mosquitto.url}\n"
        "scan:\n  microscope: sim://\n  fields: 1\n  scan_on_insert: false\n"
        "ota:\n  health_slides: 1\n  health_seconds: 1.0\n  health_check_interval_s: 0.2\n"
    )
    # 1. trust the fleet's signing key
    assert omis("ota", "trust", str(keys.public), "--state-dir", str(state)).returncode == 0
    with Collector(mosquitto.port, f"{BASE}/#") as col:
        # 2. start the daemon on the empty model store
        proc = subprocess.Popen(
            [*OMIS, "serve", "--config", str(config), "--state-dir", str(state)],
            stdout=subprocess.DEVNULL,
            stderr=log.open("w"),
            env=dict(os.environ),
        )
        try:
            assert wait_until(lambda: b"online" in col.on("/availability"), 60)
            # (before the scanner step the status says scanner_unavailable; then no_model)
            assert wait_until(lambda: _last_status(col).get("reasons") == ["no_model"], 30), (
                log.read_text()[-2000:]
            )
            status = col.json_on("/status")[-1]
            validate("status", status)
            assert (status["state"], status["reasons"], status["model"]) == (
                "degraded",
                ["no_model"],
                None,
            )
            publish(mosquitto.port, f"{BASE}/cmd/scan", b'{"slide_id": "S-1"}', b"before")
            assert wait_until(lambda: _replies(col, "before"), 10)
            (refused,) = _replies(col, "before")
            validate("reply", refused)
            assert refused["error"]["code"] == "no_model"  # type: ignore[index]
            # 3. publish the first model
            done = omis(
                "ota", "publish", str(archive), "--broker", mosquitto.url,
                "--device-id", DEVICE, "--wait", "60",
            )  # fmt: skip
            assert done.returncode == 0, done.stderr[-2000:]
            assert wait_until(
                lambda: any(
                    (s.get("last_outcome") or {}).get("result") == "committed"
                    for s in col.json_on("/ota/state")
                ),
                60,
            ), col.json_on("/ota/state")[-3:]
            assert wait_until(lambda: _last_status(col).get("state") == "idle", 10)
            assert col.json_on("/status")[-1]["model"]["version"] == 1
            # 4. it scans
            publish(mosquitto.port, f"{BASE}/cmd/scan", b'{"slide_id": "sim0-0002"}', b"after")
            assert wait_until(lambda: len(col.unique_results()) >= 1, 60)
            (result,) = col.unique_results().values()
            validate("result", result)
            assert result["model"]["version"] == 1
            assert result["outcome"] in ("classified", "abstained")
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(30) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    status = json.loads(omis("ota", "status", "--json", "--state-dir", str(state)).stdout)
    assert status["current"] == 1


def test_a_first_model_that_fails_its_health_period_leaves_the_device_without_a_model(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    """A model that reproduces its goldens but outputs NaN on every other input passes the
    gate; on a real slide it fails in ``infer`` (never a label), the health period rolls back,
    and with no previous model the device serves none again (``degraded``, ``no_model``)
    rather than the refused one."""
    state = tmp_path / "state"
    keys = generate_keypair(tmp_path / "keys", "fleet")
    nan = float("nan")
    bundle = make_bundle(tmp_path / "bundle", seed=1, version=1, off_golden=[nan, nan])
    sign_bundle(bundle.root, keys.private)
    archive = pack_bundle(bundle.root, tmp_path / "nan-v1.tar")
    log = tmp_path / "serve.log"
    config = tmp_path / "omis.yaml"
    config.write_text(
        f"device:\n  id: {DEVICE}\nmqtt:\n  broker: {mosquitto.url}\n"
        "scan:\n  microscope: sim://\n  fields: 1\n  scan_on_insert: false\n"
        "ota:\n  health_slides: 2\n  health_seconds: 60\n  health_check_interval_s: 0.2\n"
    )
    assert omis("ota", "trust", str(keys.public), "--state-dir", str(state)).returncode == 0
    with Collector(mosquitto.port, f"{BASE}/#") as col:
        proc = subprocess.Popen(
            [*OMIS, "serve", "--config", str(config), "--state-dir", str(state)],
            stdout=subprocess.DEVNULL,
            stderr=log.open("w"),
        )
        sender: subprocess.Popen[str] | None = None
        try:
            assert wait_until(lambda: col.json_on("/status")[-1:] and col.json_on("/status")[
                -1]["reasons"] == ["no_model"], 60), log.read_text()[-2000:]  # fmt: skip
            # omis ota publish waits for the final outcome: a slide must run in the meantime.
            sender = subprocess.Popen(
                [
                    *OMIS, "ota", "publish", str(archive), "--broker", mosquitto.url,
                    "--device-id", DEVICE, "--wait", "60",
                ],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )  # fmt: skip
            assert wait_until(lambda: col.json_on("/status")[-1]["model"] is not None, 30)
            publish(mosquitto.port, f"{BASE}/cmd/scan", b'{"slide_id": "sim0-0001"}', b"probe")
            out, err = sender.communicate(timeout=90)
            assert sender.returncode == 1, err[-2000:]  # exit 0 only when committed
            assert json.loads(out)["outcome"] == "rolled_back"
            assert wait_until(
                lambda: any(
                    (s.get("last_outcome") or {}).get("result") == "rolled_back"
                    for s in col.json_on("/ota/state")
                ),
                60,
            ), log.read_text()[-3000:]
            assert wait_until(lambda: col.json_on("/status")[-1]["reasons"] == ["no_model"], 10)
            # (the verdict reaches the health period before the result reaches the broker)
            assert wait_until(lambda: len(col.unique_results()) == 1, 10)
            (result,) = col.unique_results().values()
            validate("result", result)
            assert (result["outcome"], result["stage"]) == ("failed", "infer")
            assert result["prediction"]["label"] is None
            publish(mosquitto.port, f"{BASE}/cmd/scan", b'{"slide_id": "S-2"}', b"after")
            assert wait_until(lambda: _replies(col, "after"), 10)
            assert _replies(col, "after")[0]["error"]["code"] == "no_model"  # type: ignore[index]
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(30) == 0
        finally:
            for child in (sender, proc):
                if child is not None and child.poll() is None:
                    child.kill()
                    child.wait()
