"""Switch between slides, health period, commit, automatic and manual rollback."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from ota_support import make_bundle, make_keys

from deploy.ota import (
    HealthMonitor,
    HealthPolicy,
    Installer,
    InstallOptions,
    ModelStore,
    ServiceHooks,
    TrustStore,
)
from deploy.ota.exceptions import HealthCheckError, StoreError
from inference.bundle import Bundle


def _no_gate(bundle: Bundle) -> None:
    """Gate tested in test_ota_rejects; these tests are about the switch and health period."""


class FakeService:
    """Serves a model per slide behind a slide lock, like the daemon's scan loop."""

    def __init__(self) -> None:
        self.slide_lock = threading.Lock()
        self.loaded: list[int] = []
        self.refuse: str | None = None
        self.locked_during_load: list[bool] = []

    def load(self, bundle: Bundle) -> None:
        self.locked_during_load.append(self.slide_lock.locked())
        if self.refuse and bundle.manifest.version == 2:
            raise OSError(self.refuse)
        self.loaded.append(bundle.manifest.version)


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("health")
    priv, pub = make_keys(d / "keys")
    return {"pub": pub, **{f"v{v}": make_bundle(d / f"v{v}", v, key=priv) for v in (1, 2)}}


def _setup(tmp_path: Path, bundles: dict[str, Path]) -> Path:
    state = tmp_path / "state"
    TrustStore(state).add(bundles["pub"])
    Installer(ModelStore(state), TrustStore(state), _no_gate).install(bundles["v1"])
    return state


def _feed_slides(
    store: ModelStore, monitor: HealthMonitor, results: list[bool]
) -> threading.Thread:
    def run() -> None:
        while store.state()["pending"] is None or store.read_state().pending is False:
            threading.Event().wait(0.01)
        for ok in results:
            monitor.record_slide(ok, "" if ok else "classifier returned NaN")

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def _installer(state: Path, service: FakeService, **kw: object) -> tuple[Installer, ServiceHooks]:
    hooks = ServiceHooks(between_slides=lambda: service.slide_lock, load=service.load, **kw)  # type: ignore[arg-type]
    return Installer(ModelStore(state), TrustStore(state), _no_gate, hooks), hooks


SLIDES = InstallOptions(health=HealthPolicy(slides=3, seconds=30.0, check_interval_s=0.05))


def test_commit_after_good_slides(tmp_path: Path, bundles: dict[str, Path]) -> None:
    state = _setup(tmp_path, bundles)
    service = FakeService()
    installer, hooks = _installer(state, service)
    feeder = _feed_slides(installer.store, hooks.monitor, [True, True, True])
    result = installer.install(bundles["v2"], SLIDES)
    feeder.join(5)
    assert result.outcome == "committed"
    assert service.loaded == [2]
    assert service.locked_during_load == [True]  # switched between slides, never inside one
    st = ModelStore(state).state()
    assert (st["current"], st["previous"], st["pending"]) == (2, 1, None)
    assert st["last_outcome"]["result"] == "committed"


def test_failed_slide_rolls_back_automatically(tmp_path: Path, bundles: dict[str, Path]) -> None:
    state = _setup(tmp_path, bundles)
    service = FakeService()
    installer, hooks = _installer(state, service)
    feeder = _feed_slides(installer.store, hooks.monitor, [True, False])
    with pytest.raises(HealthCheckError, match="classifier returned NaN"):
        installer.install(bundles["v2"], SLIDES)
    feeder.join(5)
    assert service.loaded == [2, 1]  # back on the previous model
    st = ModelStore(state).state()
    assert (st["current"], st["pending"]) == (1, None)
    assert st["last_outcome"]["result"] == "rolled_back"
    assert ModelStore(state).active().manifest.version == 1  # type: ignore[union-attr]


def test_failed_application_check_rolls_back(tmp_path: Path, bundles: dict[str, Path]) -> None:
    state = _setup(tmp_path, bundles)
    service = FakeService()

    def broker_reachable() -> None:
        raise OSError("broker unreachable: connection refused")

    installer, _ = _installer(state, service, checks=[broker_reachable])
    with pytest.raises(HealthCheckError, match="broker unreachable"):
        installer.install(bundles["v2"], SLIDES)
    assert ModelStore(state).state()["current"] == 1


def test_service_refusing_the_model_rolls_back(tmp_path: Path, bundles: dict[str, Path]) -> None:
    state = _setup(tmp_path, bundles)
    service = FakeService()
    service.refuse = "engine did not deserialise"
    installer, _ = _installer(state, service)
    with pytest.raises(HealthCheckError, match="engine did not deserialise"):
        installer.install(bundles["v2"], SLIDES)
    assert ModelStore(state).state()["current"] == 1


def test_health_period_by_time_uses_monotonic_clock() -> None:
    now = [100.0]
    monitor = HealthMonitor(clock=lambda: now[0])
    monitor.start(HealthPolicy(slides=3, seconds=10.0))
    assert monitor.verdict() == "pending"
    monitor.record_check(True)
    monitor.record_slide(True)
    now[0] += 9.9
    assert monitor.verdict() == "pending"
    now[0] += 0.2
    assert monitor.verdict() == "healthy"
    monitor.record_slide(False, "late failure")
    assert monitor.verdict() == "unhealthy"


def test_manual_rollback_then_nothing_left(tmp_path: Path, bundles: dict[str, Path]) -> None:
    state = _setup(tmp_path, bundles)
    service = FakeService()
    installer, _ = _installer(state, service)
    installer.install(bundles["v2"])
    assert installer.rollback("operator request") == ModelStore(state).state()["models"]["current"]
    assert service.loaded == [2, 1]
    st = ModelStore(state).state()
    assert (st["current"], st["previous"]) == (1, None)
    with pytest.raises(StoreError, match="nothing to roll back"):
        installer.rollback("again")
    # v2 may be installed again after a rollback (it is newer than the current model).
    installer.install(bundles["v2"])
    assert ModelStore(state).state()["current"] == 2


def test_store_lock_refuses_a_second_operation(tmp_path: Path, bundles: dict[str, Path]) -> None:
    state = _setup(tmp_path, bundles)
    holder = ModelStore(state)
    with holder.lock():
        other = Installer(ModelStore(state), TrustStore(state), _no_gate)
        with pytest.raises(StoreError, match="in progress"):
            other.install(bundles["v2"])
    assert ModelStore(state).state()["current"] == 1


def test_state_payload_matches_the_shipped_schema(tmp_path: Path, bundles: dict[str, Path]) -> None:
    from deploy.ota.delivery import ota_state_payload
    from deploy.schemas import validate

    state = _setup(tmp_path, bundles)
    payload = ota_state_payload(ModelStore(state), {"step": "health", "slides": 1})
    validate("ota_state", payload)
    assert payload["current"] == 1 and payload["progress"]["step"] == "health"
