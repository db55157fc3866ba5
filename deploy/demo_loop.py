"""``omis demo --loop``: the lab's data loop on simulated slides, end to end.

1. the demo's model (cached, as ``omis demo``) and an embedded broker and archive;
2. round 1: scan simulated slides (``omis scan``), then sign every result out **through the
   archive's API** with the simulator's truth as the verdict -- a stand-in for a
   cytotechnologist, and said so on screen;
3. ``omis dataset export --api`` the signed-out slides and ``omis train --preset spectrum1d`` a
   new bundle (the next version) on them;
4. round 2: scan new slides with the new bundle and sign them out the same way;
5. ``omis dataset export`` round 2 alone and ``omis validate`` the new bundle on it, locked;
6. show both models' performance from the archive (``GET /api/performance``).

Every step is the real command in a child process (as an operator would run it) or the real API.
The numbers describe the simulator, not clinical performance.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import secrets
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from deploy.broker import EmbeddedBroker
from deploy.cli_dataset import TOKEN_ENV
from deploy.collector.embedded import EmbeddedArchive, embedded_archive
from deploy.demo import DEVICE_ID, DemoConfig, _omis, _run_step, _stale_reason, ensure_dataset
from deploy.exceptions import ConfigError, DeployError

log = logging.getLogger(__name__)

# the simulator's Pap group -> the Bethesda category a cytotechnologist would sign out
SIM_VERDICT = {"II": "NILM", "III": "LSIL", "IV": "HSIL", "V": "SCC"}
SIGNER = "demo-cytotech"


@dataclass(frozen=True)
class LoopConfig:
    """How big the loop is; the defaults take a few minutes on two cores."""

    demo: DemoConfig
    round1: int = 24
    round2: int = 12
    folds: int = 3
    epochs: int = 30
    wait_s: float = 60.0
    # the model in service before the loop: a quick one on part of the demo's synthetic set
    first_slides: int = 80
    first_epochs: int = 25


class _Api:
    """The archive's HTTP API as the demo's stand-in cytotechnologist uses it."""

    def __init__(self, base: str, user: str, password: str) -> None:
        self.base = base.rstrip("/")
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        self.headers = {"Authorization": f"Basic {token}", "Content-Type": "application/json"}
        self.token = f"{user}:{password}"

    def call(self, method: str, path: str, body: Any = None) -> Any:
        data = None if body is None else json.dumps(body, allow_nan=False).encode()
        req = urllib.request.Request(  # noqa: S310 (our own http:// URL)
            self.base + path, data=data, headers=self.headers, method=method
        )
        with urllib.request.urlopen(req, timeout=30) as resp:  # noqa: S310
            return json.loads(resp.read())


@dataclass(frozen=True)
class _Rounds:
    """What every scan round needs."""

    cfg: LoopConfig
    api: _Api
    port: int
    console: Console

    def scan(self, bundle: Path, seed: int, n: int) -> None:
        """``omis scan`` of ``n`` simulated slides of ``seed`` with ``bundle``."""
        demo = self.cfg.demo
        argv = _omis(
            "scan", "--microscope", f"sim://?seed={seed}", "--broker",
            f"mqtt://127.0.0.1:{self.port}", "--bundle", str(bundle), "--slides", str(n),
            "--fields", str(demo.fields), "--device-id", DEVICE_ID, "--state-dir",
            str(demo.cache_dir / "loop" / f"state-{seed}"), "--quiet",
        )  # fmt: skip
        log_path = demo.cache_dir / "last-loop-scan.log"
        with open(log_path, "w", encoding="utf-8") as log_file:
            proc = subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=log_file, check=False)
        if proc.returncode != 0:
            raise DeployError(f"omis scan exited with {proc.returncode}; see {log_path}")

    def run(self, step: str, bundle: Path, seed: int, n: int) -> None:
        """Scan, wait for the archive, sign out through the API."""
        manifest = json.loads((bundle / "manifest.json").read_text(encoding="utf-8"))
        model = f"{manifest['name']} v{manifest['version']}"
        self.console.rule(f"[bold]{step} scan {n} simulated slides with {model}")
        self.scan(bundle, seed, n)
        items = _archived(self.api, seed, n, self.cfg.wait_s)
        if len(items) < n:
            raise DeployError(f"only {len(items)} of {n} results reached the archive")
        signed = _sign_out(self.api, items, self.console)
        self.console.print(f"archived {len(items)} results, signed out {signed}")


def _archived(api: _Api, seed: int, n: int, wait_s: float) -> list[dict[str, Any]]:
    deadline = time.monotonic() + wait_s
    query = urllib.parse.urlencode({"slide": f"sim{seed}-", "limit": 1000})
    while True:
        items: list[dict[str, Any]] = api.call("GET", f"/api/results?{query}")["items"]
        if len(items) >= n or time.monotonic() > deadline:
            return items
        time.sleep(0.2)


def _sign_out(api: _Api, items: list[dict[str, Any]], console: Console) -> int:
    console.print(
        f"[yellow]signing out {len(items)} results through POST /api/results/…/review as "
        f"{SIGNER!r}: the simulator's truth stands in for a cytotechnologist's verdict"
    )
    signed = 0
    for item in items:
        full = api.call("GET", f"/api/results/{item['message_id']}")
        payload = full["result"]
        group = (payload.get("simulation") or {}).get("pap_group")
        if group not in SIM_VERDICT:
            continue  # not a simulated slide: no truth to stand in with
        body = {"bethesda": SIM_VERDICT[group], "adequacy": "satisfactory"}
        api.call("POST", f"/api/results/{item['message_id']}/review", body)
        signed += 1
    return signed


def _export(api: _Api, out: Path, console: Console, title: str, since: str | None) -> None:
    if out.exists():
        shutil.rmtree(out)
    argv = _omis("dataset", "export", "--api", api.base, "--out", str(out))
    argv += ["--since", since] if since else []
    console.rule(f"[bold]{title}")
    console.print(f"[dim]$ OMIS_ARCHIVE_TOKEN=… omis {' '.join(argv[3:])}")
    # the credentials travel in the environment, never on a command line others can read
    env = {**os.environ, TOKEN_ENV: api.token}
    proc = subprocess.run(argv, env=env, check=False)
    if proc.returncode != 0:
        raise DeployError(f"demo step failed ({title}): exit code {proc.returncode}")


def _performance_table(api: _Api) -> Table:
    body = api.call("GET", f"/api/performance?device={DEVICE_ID}")
    table = Table(title="Performance in service, from the archive (GET /api/performance)")
    for col in ("model", "results", "reviewed", "sensitivity", "specificity", "referral", "PSI"):
        table.add_column(col, justify="right" if col != "model" else "left")

    def pct(p: dict[str, Any]) -> str:
        if p.get("value") is None:
            return "n/a"
        return f"{100 * p['value']:.0f}% ({p['successes']}/{p['n']})"

    for m in body["models"]:
        drift = (m.get("drift") or {}).get("p_high") or {}
        psi = drift.get("psi")
        table.add_row(
            f"{m['model']} v{m['version']}",
            str(m["counts"]["results"]),
            str(m["counts"]["reviewed"]),
            pct(m["sensitivity"]),
            pct(m["specificity"]),
            pct(m["referral_rate"]),
            "n/a" if psi is None else f"{psi:.2f}",
        )
    return table


def _add_baseline(archive: EmbeddedArchive, bundle: Path, console: Console) -> None:
    from deploy.collector.performance import load_baselines

    loop = archive.service.loop
    if loop is None:
        raise DeployError("the archive is not started")
    try:
        loop.baselines.update(load_baselines([bundle]))
    except ConfigError as exc:
        console.print(f"[yellow]{bundle}: no drift comparison ({exc})")


def _add_signer(directory: Path, password: str) -> None:
    """The demo's stand-in cytotechnologist as an archive user (sign-out needs ``cytotech``)."""
    from deploy.collector.audit import Actor
    from deploy.collector.auth import UserStore
    from deploy.collector.db import migrate, open_engine

    engine = open_engine(f"sqlite:///{directory / 'collector.sqlite'}")
    try:
        migrate(engine)
        UserStore(engine).add(SIGNER, "cytotech", password, Actor("omis-demo", "admin"))
    finally:
        engine.dispose()


def _first_bundle(cfg: LoopConfig, dataset: Path, console: Console) -> Path:
    """The model in service before the loop: spectrum1d on the synthetic set (cached)."""
    demo = cfg.demo
    out = demo.cache_dir / f"{dataset.name}-loop-m{cfg.first_slides}-e{cfg.first_epochs}"
    bundle = out / "bundle"
    if (bundle / "manifest.json").is_file() and _stale_reason(bundle) is None:
        console.print(f"[green]model in service[/]: cached bundle {bundle}")
        return bundle
    if out.exists():
        shutil.rmtree(out)
    _run_step(
        console,
        "0/6 train the model in service on the synthetic set",
        _omis(
            "train", "--data", str(dataset), "--out", str(out), "--preset", "spectrum1d",
            "--folds", str(demo.folds), "--seed", str(demo.seed), "--name", "omis-demo-1d",
            "--max-slides", str(cfg.first_slides), "--epochs", str(cfg.first_epochs),
        ),
    )  # fmt: skip
    return bundle


def run_loop(cfg: LoopConfig, console: Console | None = None) -> int:
    """Run the loop demo; returns 0 when every step passed."""
    console = console or Console()
    demo = cfg.demo
    demo.cache_dir.mkdir(parents=True, exist_ok=True)
    first = _first_bundle(cfg, ensure_dataset(demo, console), console)
    work = demo.cache_dir / "loop"
    if work.exists():
        shutil.rmtree(work)  # each loop starts from an empty archive
    work.mkdir(parents=True)
    password = secrets.token_urlsafe(16)
    _add_signer(work / "archive", password)
    seed1, seed2 = demo.seed + 101, demo.seed + 102
    with (
        EmbeddedBroker() as broker,
        embedded_archive(work / "archive", int(broker.port or 0)) as archive,
    ):
        api = _Api(archive.service.http_url, SIGNER, password)
        _add_baseline(archive, first, console)
        console.print(f"archive: {archive.service.db_display}; API {api.base}")
        rounds = _Rounds(cfg, api, int(broker.port or 0), console)
        rounds.run("1/6", first, seed1, cfg.round1)
        train_data = work / "export-round1"
        _export(api, train_data, console, "2/6 export the signed-out slides", None)
        model_dir = work / "model-v2"
        _run_step(
            console,
            "3/6 train the next model on the lab's own slides",
            _omis(
                "train", "--data", str(train_data), "--out", str(model_dir), "--preset",
                "spectrum1d", "--folds", str(cfg.folds), "--epochs", str(cfg.epochs),
                "--name", "omis-loop", "--version", "2", "--seed", str(demo.seed),
            ),
        )  # fmt: skip
        second = model_dir / "bundle"
        _add_baseline(archive, second, console)
        since = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - 1))
        rounds.run("4/6", second, seed2, cfg.round2)
        test_data = work / "export-round2"
        _export(api, test_data, console, "5/6 export the new slides (held out)", since)
        _run_step(
            console,
            "6/6 validate the new model, locked, on the held-out slides",
            _omis("validate", "--bundle", str(second), "--data", str(test_data)),
        )
        console.print(_performance_table(api))
    console.print(
        "[yellow]These numbers describe the synthetic sample simulator, not clinical performance."
    )
    return 0


def loop_config(
    demo: DemoConfig, *, round1: int = 24, round2: int = 12, folds: int = 3, epochs: int = 30
) -> LoopConfig:
    """A loop configuration around the demo's."""
    return LoopConfig(demo, round1=round1, round2=round2, folds=folds, epochs=epochs)
