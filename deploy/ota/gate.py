"""The default model checker of an install: the device's own backends and golden gate.

:class:`GoldenGate` is the installer's ``ModelChecker`` seam: it opens the bundle's backend the
way the service will (a TensorRT engine built or loaded under the state dir) and requires the
golden outputs, then the golden field pairs through the whole device path
(:func:`inference.golden.open_checked`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from deploy.ota.exceptions import HealthCheckError, ModelCheckError
from deploy.ota.install import ModelChecker
from deploy.ota.store import ModelStore
from inference.bundle import Bundle
from inference.exceptions import InferenceError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GoldenGate:
    """Open ``backend`` for the bundle (building/loading a TensorRT engine under ``state_dir``)
    and require the golden outputs within the manifest's tolerance and the same top class."""

    backend: str = "auto"
    state_dir: Path | None = None
    spectrum_backend: str = "auto"

    def __call__(self, bundle: Bundle) -> None:
        """Raise :class:`ModelCheckError` unless the model reproduces its golden outputs,
        from the golden tensors and from the golden field pairs through the device path."""
        from inference.backends import BackendOptions
        from inference.golden import open_checked

        options = BackendOptions(state_dir=str(self.state_dir) if self.state_dir else None)
        try:
            backend, report = open_checked(
                self.backend, bundle, options, warmup=False, spectrum_backend=self.spectrum_backend
            )
        except InferenceError as exc:
            raise ModelCheckError(f"engine/golden gate failed: {exc}") from exc
        with backend:
            log.info("ota: golden gate passed on %s: %s", backend.name, report.summary())
            if backend.degraded:
                log.warning("ota: the new model would serve degraded: %s", backend.describe())


def store_checks(store: ModelStore, checker: ModelChecker) -> list[Callable[[], None]]:
    """Default health checks without a service: the active model loads and passes its gate."""

    def active_model_serves() -> None:
        bundle = store.active()
        if bundle is None:
            raise HealthCheckError("no active model")
        checker(bundle)

    return [active_model_serves]
