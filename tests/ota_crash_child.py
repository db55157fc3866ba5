"""Child process of the kill -9 tests: install a bundle and SIGKILL itself at one step.

Usage: python ota_crash_child.py STATE_DIR BUNDLE KILL_AT_STEP ok|unhealthy
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import Any

from deploy.ota import HealthPolicy, Installer, InstallOptions, ModelStore, ServiceHooks, TrustStore
from deploy.ota.exceptions import HealthCheckError
from inference.bundle import Bundle


def _no_gate(bundle: Bundle) -> None:
    """The golden gate is not under test here; keep the child fast."""


def _failing_check() -> None:
    raise HealthCheckError("firmware handshake failed")


def main() -> int:
    state, bundle, kill_at, mode = sys.argv[1:5]

    def on_step(step: str, detail: dict[str, Any]) -> None:
        if step == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    checks = [_failing_check] if mode == "unhealthy" else []
    hooks = ServiceHooks(checks=checks)
    store = ModelStore(Path(state))
    installer = Installer(store, TrustStore(Path(state)), _no_gate, hooks, on_step)
    opts = InstallOptions(health=HealthPolicy(slides=0, seconds=0.0, check_interval_s=0.01))
    try:
        installer.install(Path(bundle), opts)
    except HealthCheckError:
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
