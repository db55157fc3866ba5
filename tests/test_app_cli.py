"""``omis scan`` / ``omis serve`` end to end: real sim:// microscope, tiny bundle, real brokers."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from broker_support import (
    Collector,
    Mosquitto,
    mosquitto_fixture,  # noqa: F401 - the "mosquitto" fixture
    wait_until,
)
from fakes.bundles import make_bundle

from deploy.schemas import validate

OMIS = [sys.executable, "-m", "deploy.cli"]


def omis(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*OMIS, *args], check=False, capture_output=True, text=True, timeout=timeout
    )


def test_scan_sim_with_embedded_broker(tmp_path: Path) -> None:
    make_bundle(tmp_path / "bundle")
    done = omis(
        "scan",
        "--microscope",
        "sim://?seed=3",
        "--broker",
        "embedded",
        "--bundle",
        str(tmp_path / "bundle"),
        "--slides",
        "2",
        "--fields",
        "2",
        "--device-id",
        "cli1",
        "--state-dir",
        str(tmp_path / "state"),
        "--json",
    )
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout)
    assert report["summary"] == {"acknowledged": 2, "stored": 0, "failed": 0}
    assert [r["slide_id"] for r in report["results"]] == ["sim3-0000", "sim3-0001"]


def test_scan_results_reach_an_external_subscriber(mosquitto: Mosquitto, tmp_path: Path) -> None:
    make_bundle(tmp_path / "bundle")
    with Collector(mosquitto.port, "omis/v1/cli2/#") as col:
        done = omis(
            "scan",
            "--microscope",
            "sim://",
            "--broker",
            mosquitto.url,
            "--bundle",
            str(tmp_path / "bundle"),
            "--slide-id",
            "P-77",
            "--fields",
            "2",
            "--device-id",
            "cli2",
            "--state-dir",
            str(tmp_path / "state"),
        )
        assert done.returncode == 0, done.stderr[-2000:]
        assert "acknowledged by the broker" in done.stdout
        assert wait_until(lambda: len(col.results()) == 1, 10)
    result = col.results()[0]
    validate("result", result)
    assert result["slide_id"] == "P-77"
    assert result["model"]["name"] == "tiny"
    assert result["simulation"]["pap_group"] in {"II", "III", "IV", "V"}
    assert len(result["fields"]) == 2


def test_scan_with_broker_down_stores_results(tmp_path: Path) -> None:
    make_bundle(tmp_path / "bundle")
    broker = Mosquitto(tmp_path)  # never started
    done = omis(
        "scan",
        "--microscope",
        "sim://",
        "--broker",
        broker.url,
        "--bundle",
        str(tmp_path / "bundle"),
        "--slides",
        "1",
        "--fields",
        "2",
        "--ack-timeout",
        "1",
        "--state-dir",
        str(tmp_path / "state"),
        "--json",
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout)["summary"]["stored"] == 1


def test_scan_without_model_fails_clearly(tmp_path: Path) -> None:
    done = omis("scan", "--microscope", "sim://", "--state-dir", str(tmp_path))
    assert done.returncode == 1
    assert "no active model" in done.stderr
    assert done.stderr.strip().count("\n") == 0


def test_serve_health_and_sigterm(mosquitto: Mosquitto, tmp_path: Path) -> None:
    make_bundle(tmp_path / "bundle")
    state = tmp_path / "state"
    assert omis("serve", "--health", "--state-dir", str(state)).returncode == 1
    env = dict(os.environ, OMIS_SERVICE__HEALTH_INTERVAL_S="0.5", OMIS_DEVICE__ID="srv1")
    with Collector(mosquitto.port, "omis/v1/srv1/#") as col:
        proc = subprocess.Popen(
            [
                *OMIS,
                "serve",
                "--microscope",
                "sim://",
                "--broker",
                mosquitto.url,
                "--bundle",
                str(tmp_path / "bundle"),
                "--state-dir",
                str(state),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        try:
            assert wait_until(lambda: b"online" in col.on("/availability"), 60)
            assert wait_until(
                lambda: omis("serve", "--health", "--state-dir", str(state)).returncode == 0, 10
            )
            time.sleep(0.2)
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(30) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert wait_until(lambda: col.on("/availability")[-1:] == [b"stopped"], 5)
    status = col.json_on("/status")[-1]
    validate("status", status)
    assert status["model"]["name"] == "tiny"


def test_a_slide_without_a_usable_field_is_published_for_review(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    """sim5-0000's only field is dark: no classification, but the slide still gets a result."""

    make_bundle(tmp_path / "bundle")
    with Collector(mosquitto.port, "omis/v1/cli9/result") as col:
        done = omis(
            "scan", "--microscope", "sim://?seed=5", "--broker", mosquitto.url,
            "--bundle", str(tmp_path / "bundle"), "--slides", "1", "--fields", "1",
            "--device-id", "cli9", "--state-dir", str(tmp_path / "state"), "--json",
        )  # fmt: skip
        assert done.returncode == 0, done.stderr[-2000:]
        assert json.loads(done.stdout)["summary"] == {"acknowledged": 1, "stored": 0, "failed": 0}
        assert wait_until(lambda: len(col.results()) >= 1, 10)
    (result,) = col.unique_results().values()
    validate("result", result)
    assert result["slide_id"] == "sim5-0000"
    assert result["prediction"]["abstained"] is True and result["prediction"]["label"] is None
    assert (result["outcome"], result["reason"]) == ("abstained", "no_usable_field")
    assert [f["quality"] for f in result["fields"]] == ["reject"]


def test_a_multi_slide_scan_opens_each_backend_once(tmp_path: Path) -> None:
    make_bundle(tmp_path / "bundle")
    done = omis(
        "scan",
        "-v",
        "--microscope",
        "sim://?seed=3",
        "--broker",
        "embedded",
        "--bundle",
        str(tmp_path / "bundle"),
        "--slides",
        "4",
        "--fields",
        "1",
        "--state-dir",
        str(tmp_path / "state"),
    )
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stderr.splitlines()
    opened = [line for line in lines if "backend" in line and "opened" in line]
    spectrum = [line for line in opened if "spectrum backend" in line]
    inference = [line for line in opened if "inference backend" in line]
    assert len(opened) == 2, "\n".join(opened)
    assert len(spectrum) == 1, "\n".join(spectrum)
    # ... and nothing else opens (or logs) another one: the golden gate checks the one serving
    mentions = [line for line in lines if "spectrum backend" in line]
    assert len(mentions) == 1, "\n".join(mentions)
    assert len(inference) == 1, "\n".join(inference)
    assert " INFO " in spectrum[0] and "numpy" in spectrum[0]
    # and the report names each slide's outcome (abstained ones with their reason)
    outcomes = re.findall(
        r"^slide sim3-000\d: (classified \w+|abstained \(\w+\).*?)  seq", done.stdout, re.M
    )
    assert len(outcomes) == 4, done.stdout
