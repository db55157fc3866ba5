"""Broker URLs and the embedded broker: mosquitto as a child process on a loopback port.

``embedded[:port]`` (the default) starts ``mosquitto`` with a generated minimal configuration
(loopback only, anonymous, no persistence: it serves this process and local dashboards, the
durable copy of every result is the outbox).  Without the mosquitto binary it fails with a clear
error rather than pretending: install it (``apt-get install mosquitto``) or configure a broker.

The broker dies with its parent: the child asks the kernel for SIGTERM when the process that
started it dies (``PR_SET_PDEATHSIG``, checked against a parent that died before the call), so
even a SIGKILL of the appliance leaves no orphaned mosquitto.  Its temporary directory records
the owner's pid; the next start removes directories whose owner is gone.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from urllib.parse import urlsplit

from deploy.exceptions import BrokerError
from firmware_bridge.fsutil import pid_alive

log = logging.getLogger(__name__)

DEFAULT_PORTS = {"mqtt": 1883, "mqtts": 8883}
MOSQUITTO_CANDIDATES = ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto")
_START_ATTEMPTS = 3
WORKDIR_PREFIX = "omis-broker-"
OWNER_FILE = "owner.pid"
_PR_SET_PDEATHSIG = 1


def _die_with_parent(parent: int) -> None:
    """Child side, between fork and exec: SIGTERM when ``parent`` dies (Linux ``prctl``)."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0) != 0:
        os._exit(126)  # no guarantee, no broker: the parent reports that it did not start
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(126)


def reap_stale_workdirs(tmp_root: Path | None = None) -> list[Path]:
    """Remove embedded-broker directories whose owning process is gone; returns them."""
    root = Path(tmp_root or tempfile.gettempdir())
    removed: list[Path] = []
    for workdir in root.glob(f"{WORKDIR_PREFIX}*"):
        try:
            if workdir.stat().st_uid != os.geteuid():
                continue
            owner = int((workdir / OWNER_FILE).read_text("utf-8").strip())
        except (OSError, ValueError):
            continue  # not ours, or not written by this version: leave it
        if owner != os.getpid() and not pid_alive(owner):
            shutil.rmtree(workdir, ignore_errors=True)
            removed.append(workdir)
    if removed:
        log.info("removed %d stale embedded-broker director(y/ies)", len(removed))
    return removed


@dataclass(frozen=True)
class BrokerAddress:
    """Where to connect: ``scheme`` is mqtt, mqtts or embedded (port None = any free port)."""

    scheme: str
    host: str
    port: int | None

    @property
    def tls(self) -> bool:
        """True for ``mqtts://``."""
        return self.scheme == "mqtts"

    def __str__(self) -> str:
        if self.scheme == "embedded":
            return "embedded" if self.port is None else f"embedded:{self.port}"
        return f"{self.scheme}://{self.host}:{self.port}"


def _parse_port(text: str, url: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise BrokerError(f"{url!r}: bad port {text!r}")
    return int(text)


def parse_broker_url(url: str) -> BrokerAddress:
    """Parse ``mqtt://host[:port]``, ``mqtts://host[:port]`` or ``embedded[:port]``."""
    text = url.strip()
    if text == "embedded" or text.startswith("embedded:"):
        port_text = text.partition(":")[2]
        port = _parse_port(port_text, url) if port_text else None
        return BrokerAddress("embedded", "127.0.0.1", port)
    parts = urlsplit(text)
    if parts.scheme not in DEFAULT_PORTS or not parts.hostname:
        raise BrokerError(f"{url!r}: expected mqtt://host:port, mqtts://host:port or embedded")
    try:
        port = parts.port or DEFAULT_PORTS[parts.scheme]
    except ValueError as exc:
        raise BrokerError(f"{url!r}: bad port") from exc
    return BrokerAddress(parts.scheme, parts.hostname, port)


def find_mosquitto() -> str | None:
    """Path of the mosquitto binary, or None."""
    found = shutil.which("mosquitto")
    if found:
        return found
    return next((p for p in MOSQUITTO_CANDIDATES if os.access(p, os.X_OK)), None)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(host: str, port: int, timeout_s: float) -> bool:
    """True once a TCP connection to ``host:port`` succeeds within ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
            return True
        time.sleep(0.05)
    return False


def same_user_setting() -> str:
    """The ``user`` line that keeps mosquitto under this process's user.

    Started as root, mosquitto switches to the user ``mosquitto``, which cannot write into
    directories this process created (mode 0700): its log and its persistence file would be
    lost without a word.  Started as any other user it cannot switch, and the line is not needed.
    """
    if os.geteuid() != 0:
        return ""
    return f"user {pwd.getpwuid(0).pw_name}\n"


def mosquitto_config(port: int, workdir: Path, websocket_port: int | None = None) -> str:
    """The minimal embedded configuration: loopback only, no persistence; with
    ``websocket_port`` also MQTT over WebSockets there (for a local dashboard)."""
    websockets = (
        ""
        if websocket_port is None
        else f"listener {websocket_port} 127.0.0.1\nprotocol websockets\n"
    )
    return (
        f"listener {port} 127.0.0.1\n" + websockets + same_user_setting() + "allow_anonymous true\n"
        "persistence false\n"
        f"log_dest file {workdir / 'mosquitto.log'}\n"
        "log_type error\nlog_type warning\nlog_type notice\n"
    )


class EmbeddedBroker:
    """mosquitto as a child process; a context manager with an idempotent ``close()``."""

    def __init__(
        self, port: int | None = None, binary: str | None = None, *, websockets: bool = False
    ) -> None:
        self.requested_port = port
        self.binary = binary
        self.websockets = websockets
        self.port: int | None = None
        self.websocket_port: int | None = None  # with websockets=True, after start()
        self._proc: subprocess.Popen[bytes] | None = None
        self._workdir: tempfile.TemporaryDirectory[str] | None = None

    @property
    def websocket_url(self) -> str:
        """``ws://127.0.0.1:PORT/mqtt`` of the WebSockets listener (``websockets=True``)."""
        if self.websocket_port is None:
            raise BrokerError("embedded broker has no WebSockets listener")
        return f"ws://127.0.0.1:{self.websocket_port}/mqtt"

    @property
    def address(self) -> BrokerAddress:
        """Where clients connect (after :meth:`start`)."""
        if self.port is None:
            raise BrokerError("embedded broker is not started")
        return BrokerAddress("mqtt", "127.0.0.1", self.port)

    def start(self, timeout_s: float = 10.0) -> BrokerAddress:
        """Start mosquitto and wait until it accepts connections."""
        binary = self.binary or find_mosquitto()
        if binary is None:
            raise BrokerError(
                "embedded broker needs mosquitto, which is not installed "
                "(apt-get install mosquitto), or configure mqtt://host:port"
            )
        reap_stale_workdirs()
        self._workdir = tempfile.TemporaryDirectory(prefix=WORKDIR_PREFIX)
        workdir = Path(self._workdir.name)
        (workdir / OWNER_FILE).write_text(f"{os.getpid()}\n", "utf-8")
        # A free port can be taken between probing and binding: retry with a new one.
        attempts = 1 if self.requested_port else _START_ATTEMPTS
        for _ in range(attempts):
            port = self.requested_port or free_port()
            if self._try_start(binary, port, workdir, timeout_s):
                self.port = port
                log.info("embedded broker (mosquitto) on 127.0.0.1:%d", port)
                return self.address
        log_text = self._read_log(workdir)
        self.close()
        raise BrokerError(f"embedded mosquitto did not start: {log_text or 'no log output'}")

    def _try_start(self, binary: str, port: int, workdir: Path, timeout_s: float) -> bool:
        conf = workdir / "mosquitto.conf"
        ws_port = free_port() if self.websockets else None
        conf.write_text(mosquitto_config(port, workdir, ws_port), "utf-8")
        parent = os.getpid()
        proc = subprocess.Popen(
            [binary, "-c", str(conf)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=lambda: _die_with_parent(parent),  # noqa: PLW1509 - prctl needs it
        )
        deadline = time.monotonic() + timeout_s
        ports = [port] if ws_port is None else [port, ws_port]
        while time.monotonic() < deadline and proc.poll() is None:
            if all(wait_for_port("127.0.0.1", p, 0.2) for p in ports):
                self._proc = proc
                self.websocket_port = ws_port
                return True
        proc.kill()
        proc.wait()
        return False

    @staticmethod
    def _read_log(workdir: Path) -> str:
        try:
            return (workdir / "mosquitto.log").read_text("utf-8", "replace").strip()[-500:]
        except OSError:
            return ""

    def close(self) -> None:
        """Stop the broker and remove its files (idempotent)."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        workdir, self._workdir = self._workdir, None
        if workdir is not None:
            workdir.cleanup()

    def __enter__(self) -> EmbeddedBroker:
        if self._proc is None:
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
