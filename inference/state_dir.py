"""Where on-device state lives: one precedence, used by every command and backend.

``--state-dir`` (an explicit option), else ``$OMIS_STATE_DIR``, else the configuration file's
``device.state_dir`` (``omis serve`` / ``omis scan`` only), else :data:`DEFAULT_STATE_DIR`.
The result outbox, the model store, the engine cache and the trusted keys all live under it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

DEFAULT_STATE_DIR = Path("/var/lib/omis")
STATE_DIR_ENV = "OMIS_STATE_DIR"


def resolve_state_dir(
    option: str | os.PathLike[str] | None = None,
    configured: str | os.PathLike[str] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Path:
    """The state directory: ``option``, else ``$OMIS_STATE_DIR``, else ``configured``, else
    ``/var/lib/omis``.  Empty strings count as not given."""
    env = (os.environ if environ is None else environ).get(STATE_DIR_ENV)
    for candidate in (option, env, configured):
        if candidate is not None and str(candidate) != "":
            return Path(candidate)
    return DEFAULT_STATE_DIR
