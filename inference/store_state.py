"""The model store's state file, read side: one reader for the device CLI and the store itself.

The model store (``deploy/ota/store.py``) owns the layout under ``<state-dir>/models/`` and
every write.  ``omis infer`` and ``omis bench`` (in :mod:`inference`, which must not import
:mod:`deploy`) need to know which bundle is active, so the records of ``state.json`` and the
function that reads them live here, and the store reads its state through them too: both always
agree on what is installed and on what counts as a corrupt state file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from firmware_bridge.exceptions import InputError
from firmware_bridge.paths import safe_join
from inference.bundle import now_rfc3339
from inference.exceptions import ModelStoreError

MODELS_DIR = "models"
STATE_FILE = "state.json"
BUNDLES_DIR = "bundles"

M = TypeVar("M", bound=BaseModel)
OutcomeResult = Literal["committed", "rolled_back", "rejected", "interrupted"]


class Record(BaseModel):
    """Base of the store's JSON records: frozen, unknown keys rejected."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, frozen=True)


class Slot(Record):
    """One installed bundle, as the state file names it."""

    dir: str = Field(pattern=r"^v\d+-[0-9a-f]{12}-[0-9a-f]{8}$", description="under bundles/")
    name: str = Field(description="bundle name")
    version: int = Field(ge=1, description="manifest version")
    sha256: str = Field(description="sha256 of model.onnx")
    manifest_sha256: str = Field(description="sha256 of the exact manifest bytes")
    signer: str = Field(description="fingerprint of the key that signed it")
    installed_at: str = Field("", description="informational only; never used for validity")

    def describe(self) -> dict[str, Any]:
        """Name, version, model sha256, signer."""
        return {
            "name": self.name,
            "version": self.version,
            "sha256": self.sha256,
            "signer": self.signer,
        }


class Outcome(Record):
    """What the last OTA operation did."""

    result: OutcomeResult
    version: int | None = Field(None, description="the version the operation was about")
    reason: str = Field("", description="why (empty for a plain commit)")
    at: str = Field(default_factory=now_rfc3339, description="informational device time")


class StoreState(Record):
    """Content of ``state.json``."""

    generation: int = Field(0, description="grows on every switch; services reload on change")
    current: Slot | None = None
    previous: Slot | None = None
    pending: bool = Field(False, description="current is switched but not yet committed")
    last_outcome: Outcome | None = None


def read_record(path: Path, cls: type[M]) -> M | None:
    """The record in ``path`` (None when the file does not exist); unreadable or invalid is an
    error naming the file."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ModelStoreError(f"{path}: cannot read ({exc})") from exc
    try:
        return cls.model_validate(json.loads(data))
    except (ValueError, ValidationError) as exc:
        raise ModelStoreError(f"{path}: corrupt ({exc})") from exc


def read_state(models_root: Path) -> StoreState:
    """The committed-to-disk state of the store at ``models_root`` (empty when none exists)."""
    return read_record(models_root / STATE_FILE, StoreState) or StoreState()


def active_bundle_path(state_dir: Path) -> Path:
    """Directory of the active (``current``) model of the store under ``state_dir``."""
    root = Path(state_dir) / MODELS_DIR
    current = read_state(root).current
    if current is None:
        raise ModelStoreError(f"no active model in {root}; install one or pass --bundle")
    return slot_path(root, current.dir)


def slot_path(models_root: Path, slot_dir: str) -> Path:
    """Directory of the installed slot ``slot_dir`` (read from the state file: validated, and
    never outside ``bundles/``)."""
    try:
        return safe_join(models_root / BUNDLES_DIR, slot_dir, what="slot directory")
    except InputError as exc:
        raise ModelStoreError(f"{models_root}: {exc}") from exc
