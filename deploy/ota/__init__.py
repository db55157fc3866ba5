"""Over-the-air model updates: signed bundles, trust store, model store, installer, delivery.

Entry points for the appliance daemon (see ``docs/ota.md``)::

    store = ModelStore(state_dir); store.recover()        # at start-up, before serving
    bundle = store.active()                               # the model to serve (or None)
    installer = Installer(store, TrustStore(state_dir), GoldenGate(state_dir=state_dir), hooks)
    installer.install(path, InstallOptions(health=HealthPolicy(slides=3, seconds=60)))
    store.state()                                         # the ota/state payload
"""

from deploy.ota.exceptions import OtaError
from deploy.ota.gate import GoldenGate
from deploy.ota.install import (
    HealthMonitor,
    HealthPolicy,
    Installer,
    InstallOptions,
    InstallResult,
    ModelChecker,
    ServiceHooks,
)
from deploy.ota.store import ModelStore
from deploy.ota.trust import TrustStore

__all__ = [
    "GoldenGate",
    "HealthMonitor",
    "HealthPolicy",
    "InstallOptions",
    "InstallResult",
    "Installer",
    "ModelChecker",
    "ModelStore",
    "OtaError",
    "ServiceHooks",
    "TrustStore",
]
