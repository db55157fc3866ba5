"""What the OTA controller is configured with and what the service lends it."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

from deploy.appliance.base import ScannerInfo
from deploy.appliance.health import HEALTH_SIGNIFICANCE
from deploy.config import OtaConfig
from deploy.ota.exceptions import HealthCheckError, OtaError
from deploy.ota.install import HealthPolicy
from inference.exceptions import InferenceError

PASS_THROUGH = (OtaError, InferenceError, OSError)  # already say what failed


@dataclass(frozen=True)
class OtaSettings:
    """Knobs of the daemon's OTA path (defaults as ``docs/ota.md`` suggests; the service takes
    them from the ``ota:`` configuration section unless given explicitly)."""

    health: HealthPolicy = field(
        default_factory=lambda: HealthPolicy(slides=3, seconds=600.0, check_interval_s=30.0)
    )
    need_after_s: float = 5.0  # no chunk for this long while some are missing: ask again
    transfer_timeout_s: float = 300.0  # no chunk for this long: the offer is refused
    fetch_timeout_s: float = 60.0  # HTTPS download socket timeout
    checks: Sequence[Callable[[], None]] = ()  # extra application health checks; raise to fail
    significance: float = HEALTH_SIGNIFICANCE  # level of the health period's rate tests

    @classmethod
    def from_config(cls, config: OtaConfig) -> OtaSettings:
        """The settings of the configuration file's ``ota:`` section."""
        return cls(
            health=HealthPolicy(
                slides=config.health_slides,
                seconds=config.health_seconds,
                check_interval_s=config.health_check_interval_s,
            ),
            need_after_s=config.need_after_s,
            transfer_timeout_s=config.transfer_timeout_s,
            fetch_timeout_s=config.fetch_timeout_s,
            significance=config.health_significance,
        )


@dataclass(frozen=True)
class OtaPorts:
    """What the service lends the controller."""

    slide_lock: Callable[[], AbstractContextManager[object]]
    publish: Callable[[str, bytes, bool], None]  # (topic, payload, retain); QoS 1
    set_updating: Callable[[bool], None]
    model_loaded: Callable[[ScannerInfo], None]
    connected: Callable[[], bool]
    base_topic: str  # <prefix>/<device>
    prefix: str
    device_id: str
    shadow_changed: Callable[[dict[str, Any] | None], None] | None = None  # the held candidate


def ota_health_checks(
    connected: Callable[[], bool], stopping: threading.Event, extra: Sequence[Callable[[], None]]
) -> list[Callable[[], None]]:
    """The application checks of a health period: not stopping, broker reachable, ``extra``."""

    def broker_reachable() -> None:
        if not connected():
            raise HealthCheckError("broker unreachable")

    def not_stopping() -> None:
        if stopping.is_set():
            raise HealthCheckError("the appliance is stopping")

    return [not_stopping, broker_reachable, *map(_wrapped, extra)]


def _wrapped(check: Callable[[], None]) -> Callable[[], None]:
    """An injected check whose every error counts as a failed health check."""

    def run() -> None:
        try:
            check()
        except PASS_THROUGH:
            raise
        except Exception as exc:
            raise HealthCheckError(f"{getattr(check, '__name__', 'check')}: {exc}") from exc

    return run
