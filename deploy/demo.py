"""``omis demo``: the main job end to end on simulated hardware, with a live table.

Steps, each skipped when its output is cached:

1. synthesise a small training set with the OMIS sample simulator (``omis dataset synth``);
2. train the ``tiny`` model on it and export a bundle (``omis train``);
3. start the embedded broker and subscribe to this demo device's topics;
4. scan a few simulated slides headlessly (``omis scan --microscope sim://``), which acquires
   through the simulated firmware on a pseudo-terminal, computes spectra, classifies and
   publishes every result through the durable outbox;
5. show each result as it arrives and a summary.

The demo drives the real commands as child processes, exactly as an operator would.  Numbers
it prints describe the simulator, not clinical performance.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from rich.console import Console
from rich.live import Live
from rich.table import Table

from deploy.broker import EmbeddedBroker
from deploy.collector.embedded import EmbeddedArchive, embedded_archive
from deploy.exceptions import DeployError
from deploy.messages.base import Message
from deploy.messages.parsing import MessageError, parse_message
from firmware_bridge.sim.sample import RISK

log = logging.getLogger(__name__)

DEVICE_ID = "demo-edge"
PREFIX = "omis/v1"


@dataclass(frozen=True)
class DemoConfig:
    """What the demo does; the defaults keep it to a few minutes on two CPU cores."""

    cache_dir: Path
    slides: int = 6
    fields: int = 3
    seed: int = 2026
    train_slides: int = 200
    train_fields: int = 2
    train_size: str = "320x256"
    folds: int = 3
    fresh: bool = False
    dashboard: bool = False  # keep the broker and the archive running until Ctrl-C


@dataclass
class DemoRun:
    """Results received so far, keyed by message id (duplicates are recognised)."""

    results: dict[str, dict[str, Any]] = field(default_factory=dict)
    duplicates: int = 0
    availability: str = "unknown"
    status: dict[str, Any] = field(default_factory=dict)


def default_cache_dir() -> Path:
    """``$OMIS_CACHE_DIR``, else ``$XDG_CACHE_HOME/omis-edge``, else ``~/.cache/omis-edge``."""
    env = os.environ.get("OMIS_CACHE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "omis-edge"


def _omis(*args: str) -> list[str]:
    return [sys.executable, "-m", "deploy.cli", *args]


def _run_step(console: Console, title: str, argv: list[str]) -> None:
    console.rule(f"[bold]{title}")
    console.print(f"[dim]$ omis {' '.join(argv[3:])}")
    proc = subprocess.run(argv, check=False)  # progress bars go straight to the terminal
    if proc.returncode != 0:
        raise DeployError(f"demo step failed ({title}): exit code {proc.returncode}")


def ensure_dataset(cfg: DemoConfig, console: Console) -> Path:
    """The cached synthetic training set, synthesised when missing."""
    out = cfg.cache_dir / f"dataset-s{cfg.seed}-n{cfg.train_slides}-{cfg.train_size}"
    if (out / "manifest.csv").is_file():
        console.print(f"[green]dataset[/]: cached in {out}")
        return out
    if out.exists():
        shutil.rmtree(out)
    _run_step(
        console,
        "1/4 synthesise a training set (simulated Pap smears)",
        _omis(
            "dataset", "synth", "--out", str(out), "--slides", str(cfg.train_slides),
            "--fields", str(cfg.train_fields), "--size", cfg.train_size, "--seed", str(cfg.seed),
        ),
    )  # fmt: skip
    return out


def ensure_bundle(cfg: DemoConfig, dataset: Path, console: Console) -> Path:
    """The cached tiny model bundle, trained when missing or no longer servable."""
    out = cfg.cache_dir / f"{dataset.name}-tiny"
    bundle = out / "bundle"
    if (bundle / "manifest.json").is_file():
        stale = _stale_reason(bundle)
        if stale is None:
            console.print(f"[green]model[/]: cached bundle {bundle}")
            return bundle
        console.print(f"[yellow]model[/]: cached bundle is stale ({stale}); training again")
    if out.exists():
        shutil.rmtree(out)
    _run_step(
        console,
        "2/4 train the tiny VGG16 and export a bundle",
        _omis(
            "train", "--data", str(dataset), "--out", str(out), "--preset", "tiny",
            "--folds", str(cfg.folds), "--seed", str(cfg.seed), "--name", "omis-demo-tiny",
        ),
    )  # fmt: skip
    return bundle


def _stale_reason(bundle: Path) -> str | None:
    """Why a cached bundle cannot serve with this code (an older format), or None."""
    from inference.bundle import load_bundle
    from inference.exceptions import BundleError

    try:
        loaded = load_bundle(bundle)
    except BundleError as exc:
        return str(exc)
    if loaded.manifest.golden.fields == 0:
        return "no golden field pairs"
    return None


def _subscriber(port: int, inbox: queue.Queue[tuple[str, bytes]]) -> mqtt.Client:
    client = mqtt.Client(
        CallbackAPIVersion.VERSION2, client_id="omis-demo-viewer", protocol=mqtt.MQTTv5
    )

    def on_connect(c: mqtt.Client, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        c.subscribe(f"{PREFIX}/{DEVICE_ID}/#", qos=1)

    def on_message(_c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        inbox.put((msg.topic, bytes(msg.payload)))

    client.on_connect = on_connect
    client.on_message = on_message
    client.connect("127.0.0.1", port)
    client.loop_start()
    return client


def _handle(run: DemoRun, topic: str, payload: bytes) -> None:
    leaf = topic.removeprefix(f"{PREFIX}/{DEVICE_ID}/")
    if leaf == "availability":
        run.availability = payload.decode("utf-8", "replace")
    elif leaf in ("status", "result"):
        try:  # read with the message models, as the archive reads them
            message = parse_message(leaf, payload)
        except MessageError as exc:
            log.warning("demo: %s", exc)
            return
        if message is None:
            return  # a cleared retained message
        data = cast(Message, message).to_json()
        if leaf == "status":
            run.status = data
        elif data.get("message_id") in run.results:
            run.duplicates += 1
        else:
            run.results[str(data.get("message_id"))] = data


def _table(run: DemoRun, expected: int) -> Table:
    table = Table(
        title=f"Live results over MQTT ({len(run.results)}/{expected}) — "
        f"device {DEVICE_ID}: {run.availability}, {run.status.get('state', '?')}",
        caption="group/truth: the simulator's ground truth; review: abstained for a human",
    )
    for col, justify in (
        ("slide", "left"), ("group", "center"), ("truth", "center"), ("predicted", "center"),
        ("p(high)", "right"), ("review", "center"), ("QC ok", "right"), ("ms", "right"),
    ):  # fmt: skip
        table.add_column(col, justify=justify, no_wrap=True)  # type: ignore[arg-type]
    for r in sorted(run.results.values(), key=lambda r: int(r.get("seq", 0))):
        table.add_row(*_row(r))
    return table


def _true_risk(group: str | None) -> str:
    return RISK.get(group or "", "?")


def _p_high(result: dict[str, Any]) -> float:
    pred = result.get("prediction", {})
    probs: dict[str, float] = pred.get("probabilities", {})
    if "high" in probs:
        return float(probs["high"])
    return float(pred.get("p_high", float("nan")))


def _row(r: dict[str, Any]) -> list[str]:
    pred = r.get("prediction", {})
    group = (r.get("simulation") or {}).get("pap_group")
    fields = r.get("fields", [])
    ok = sum(1 for f in fields if f.get("quality") == "ok")
    # The call is the decision; an undecided slide shows where it leans, or why it has none.
    side = pred.get("side")
    risk = str(pred.get("risk") or (f"({side})" if side else r.get("reason") or "none"))
    colour = "red" if risk == "high" else "green" if risk == "low" else "yellow"
    return [
        str(r.get("slide_id")),
        str(group or "?"),
        _true_risk(group),
        f"[{colour}]{risk}[/]",
        f"{_p_high(r):.2f}",
        "yes" if pred.get("abstained") else "no",
        f"{ok}/{len(fields)}",
        f"{float(r.get('timings_ms', {}).get('total', float('nan'))):.0f}",
    ]


def _summary(console: Console, run: DemoRun, scan_report: dict[str, Any] | None) -> None:
    results = list(run.results.values())
    decided = [r for r in results if not r.get("prediction", {}).get("abstained")]
    agree = sum(
        1
        for r in decided
        if _true_risk((r.get("simulation") or {}).get("pap_group"))
        == r.get("prediction", {}).get("risk")
    )
    latencies = [float(r.get("timings_ms", {}).get("total", 0.0)) for r in results]
    model = results[0].get("model", {}) if results else {}
    backend = results[0].get("backend", {}) if results else {}
    console.print()
    console.rule("[bold]summary")
    console.print(f"results delivered: {len(results)} (duplicates recognised: {run.duplicates})")
    console.print(
        f"model: {model.get('name')} v{model.get('version')} "
        f"sha256 {str(model.get('sha256', ''))[:12]}…; backend {backend.get('name')} "
        f"{backend.get('precision')}{' (DEGRADED)' if backend.get('degraded') else ''}"
    )
    if latencies:
        console.print(
            f"latency per slide: median {statistics.median(latencies):.0f} ms, "
            f"max {max(latencies):.0f} ms"
        )
    console.print(
        f"agreement with the simulator's truth: {agree}/{len(decided)} decided slides "
        f"({len(results) - len(decided)} abstained for human review)"
    )
    if scan_report is not None:
        console.print(
            f"scan report: {json.dumps(scan_report.get('summary', scan_report), allow_nan=False)}"
        )
    console.print(
        "[yellow]These numbers describe the synthetic sample simulator, not clinical performance."
    )


def _scan(
    cfg: DemoConfig, bundle: Path, port: int, state_dir: Path, log_path: Path
) -> subprocess.Popen[str]:
    argv = _omis(
        "scan", "--microscope", f"sim://?seed={cfg.seed}", "--broker", f"mqtt://127.0.0.1:{port}",
        "--bundle", str(bundle), "--slides", str(cfg.slides), "--fields", str(cfg.fields),
        "--device-id", DEVICE_ID, "--state-dir", str(state_dir), "--json", "--quiet",
    )  # fmt: skip
    # The scan's log goes to a file so that it does not tear the live table apart.
    with open(log_path, "w", encoding="utf-8") as log_file:
        return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=log_file, text=True)


def _watch(
    proc: subprocess.Popen[str],
    run: DemoRun,
    inbox: queue.Queue[tuple[str, bytes]],
    cfg: DemoConfig,
    console: Console,
) -> int:
    deadline_after_exit = 15.0
    exited_at: float | None = None
    with Live(_table(run, cfg.slides), console=console, refresh_per_second=4) as live:
        while True:
            try:
                topic, payload = inbox.get(timeout=0.25)
                _handle(run, topic, payload)
                live.update(_table(run, cfg.slides))
            except queue.Empty:
                pass
            code = proc.poll()
            if code is not None and exited_at is None:
                exited_at = time.monotonic()
            done = len(run.results) >= cfg.slides
            if exited_at is not None and (
                done or time.monotonic() - exited_at > deadline_after_exit
            ):
                live.update(_table(run, cfg.slides))
                return int(code or 0)


def _serve_until_interrupted(console: Console) -> None:
    console.print("[bold]dashboard running: press Ctrl-C to stop")
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        console.print("stopped")


@contextlib.contextmanager
def demo_services(
    archive_dir: Path, dashboard: bool, console: Console
) -> Iterator[tuple[int, EmbeddedArchive]]:
    """The embedded broker and the archive; yields (broker port, archive).

    With ``dashboard`` the broker also speaks MQTT over WebSockets and the archive names that
    listener in the page's ``config.json``: the page is live without editing anything.
    """
    with EmbeddedBroker(websockets=dashboard) as broker:
        port = broker.port
        if port is None:  # start() sets it or raises
            raise DeployError("embedded broker has no port")
        console.print(f"broker: mqtt://127.0.0.1:{port}")
        ws_url = broker.websocket_url if dashboard else None
        if ws_url is not None:
            console.print(f"dashboard broker (WebSockets): {ws_url}")
        with embedded_archive(archive_dir, port, dashboard_broker_url=ws_url) as archive:
            console.print(f"archive (omis collect): {archive.service.db_display}")
            yield port, archive


def run_demo(cfg: DemoConfig, console: Console | None = None) -> int:
    """Run the demo; returns the exit code (0 when every result arrived)."""
    console = console or Console(stderr=False)
    cfg.cache_dir.mkdir(parents=True, exist_ok=True)
    if cfg.fresh:
        for child in cfg.cache_dir.iterdir():
            shutil.rmtree(child) if child.is_dir() else child.unlink()
    dataset = ensure_dataset(cfg, console)
    bundle = ensure_bundle(cfg, dataset, console)
    console.rule("[bold]3/4 start the embedded MQTT broker")
    inbox: queue.Queue[tuple[str, bytes]] = queue.Queue()
    run = DemoRun()
    with (
        demo_services(cfg.cache_dir / "archive", cfg.dashboard, console) as (port, archive),
        tempfile.TemporaryDirectory(prefix="omis-demo-") as tmp,
    ):
        console.print(f"subscribed to {PREFIX}/{DEVICE_ID}/#")
        viewer = _subscriber(port, inbox)
        try:
            console.rule(f"[bold]4/4 scan {cfg.slides} simulated slides (sim:// over a pty)")
            log_path = cfg.cache_dir / "last-scan.log"
            console.print(f"[dim]scan log: {log_path}")
            proc = _scan(cfg, bundle, port, Path(tmp), log_path)
            code = _watch(proc, run, inbox, cfg, console)
            out, _ = proc.communicate()
            archived = archive.wait_for(set(run.results), 10.0)
            console.print(f"archived: {archived} of {len(run.results)}; history: {archive.url}")
            if cfg.dashboard:
                _serve_until_interrupted(console)
        finally:
            viewer.loop_stop()
            viewer.disconnect()
    report: dict[str, Any] | None = None
    try:
        report = json.loads(out) if out.strip() else None
    except json.JSONDecodeError:
        report = None
    _summary(console, run, report)
    if code != 0:
        raise DeployError(f"omis scan exited with {code}; see {cfg.cache_dir / 'last-scan.log'}")
    if len(run.results) < cfg.slides:
        raise DeployError(f"only {len(run.results)} of {cfg.slides} results arrived")
    return 0
