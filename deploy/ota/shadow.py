"""The shadow slot: a candidate bundle held beside the serving one, never serving.

Layout under ``<state-dir>/shadow/``::

    shadow.json         the candidate's Slot (name, version, sha256, manifest sha256, signer)
    <v>-<hash>-<txn>/   its verified bundle directory

A shadow install runs the normal installer's first half (:meth:`Installer.prepare`: one
verified unpack, anti-rollback, the golden gate with the same model checker) and then moves the
placed bundle here instead of switching to it, so the serving model never changes and a refused
candidate leaves nothing behind (the installer undoes its own work).  ``shadow.json`` is written
atomically after the move: a reader sees the old candidate, or the new one, never a mix.  The
scanner follows this file at every slide boundary
(:meth:`deploy.serving.ModelServer.follow_shadow`), so ``omis ota shadow install`` from another
process reaches a running daemon too.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
from pathlib import Path

from deploy.ota.exceptions import OtaError, RejectedError, StoreError
from deploy.ota.install import Installer, InstallOptions
from deploy.ota.signing import load_checked
from deploy.ota.store import ModelStore, Outcome, Slot
from firmware_bridge.fsutil import atomic_write_text
from inference.bundle import Bundle, Manifest
from inference.exceptions import InferenceError, ModelStoreError
from inference.result import ModelRef
from inference.store_state import read_record

log = logging.getLogger(__name__)

SHADOW_DIR = "shadow"
SHADOW_FILE = "shadow.json"


class ShadowStore:
    """The one shadow candidate of a state directory (or none)."""

    def __init__(self, state_dir: Path) -> None:
        self.root = Path(state_dir) / SHADOW_DIR

    def read(self) -> Slot | None:
        """The candidate's slot, or None when no candidate is held."""
        path = self.root / SHADOW_FILE
        if not path.is_file():
            return None
        try:
            return read_record(path, Slot)
        except ModelStoreError as exc:
            raise StoreError(f"{path}: unreadable shadow state: {exc}") from exc

    def describe(self) -> dict[str, object] | None:
        """``{name, version, sha256}`` of the candidate (``ota/state``'s ``shadow``), or None."""
        slot = self.read()
        if slot is None:
            return None
        return ModelRef(name=slot.name, version=slot.version, sha256=slot.sha256).model_dump()

    def bundle_path(self, slot: Slot) -> Path:
        """Directory of the candidate's bundle (the slot's name is checked: no traversal)."""
        if Path(slot.dir).name != slot.dir or slot.dir in ("", ".", "..", SHADOW_FILE):
            raise StoreError(f"shadow slot {slot.dir!r} is not a plain directory name")
        return self.root / slot.dir

    def open(self, slot: Slot) -> Bundle:
        """The candidate bundle, every file re-verified and the manifest matched to the slot."""
        bundle = load_checked(self.bundle_path(slot))
        if hashlib.sha256(bundle.manifest_bytes).hexdigest() != slot.manifest_sha256:
            raise StoreError(f"shadow {slot.dir}: manifest differs from the one installed")
        return bundle

    def adopt(self, placed: Path, slot: Slot) -> None:
        """Move a placed, gated bundle here and make it the candidate (the old one goes)."""
        self.root.mkdir(parents=True, exist_ok=True)
        old = self.read()
        os.replace(placed, self.bundle_path(slot))
        atomic_write_text(self.root / SHADOW_FILE, slot.model_dump_json(indent=2))
        if old is not None and old.dir != slot.dir:
            shutil.rmtree(self.bundle_path(old), ignore_errors=True)

    def clear(self) -> Slot | None:
        """Drop the candidate (state first, then its files); returns what was held."""
        old = self.read()
        (self.root / SHADOW_FILE).unlink(missing_ok=True)
        if self.root.is_dir():
            for child in self.root.iterdir():
                if child.is_dir():
                    shutil.rmtree(child, ignore_errors=True)
        return old


def check_same_spectrum(candidate: Manifest, serving_params: object, serving: str) -> None:
    """The shadow runs on the serving pipeline's spectrum of each slide: a candidate computing
    it with other parameters is refused (one line).  ``serving`` names the serving model."""
    from inference.spectrum import parse_params

    try:
        params = parse_params(candidate.spectrum)
    except InferenceError as exc:
        raise RejectedError(f"the candidate's spectrum parameters: {exc}") from exc
    if params != serving_params:
        raise RejectedError(
            "the shadow runs on the same spectrum: the candidate's spectrum parameters differ "
            f"from those of the serving {serving}"
        )


def install_shadow(
    installer: Installer, shadow: ShadowStore, source: Path, opts: InstallOptions
) -> Slot:
    """Verify, place and gate ``source`` like a normal install, then hold it as the shadow.

    The serving model is never touched; on any failure nothing of the candidate remains and
    the outcome ``rejected`` is recorded (as for a normal install).
    """
    store: ModelStore = installer.store
    with store.lock():
        store.recover()
        slot, _bundle = installer.prepare(source, opts)
        try:
            shadow.adopt(store.bundle_path(slot), slot)
        except (OSError, OtaError) as exc:
            store.clear_journal()
            store.collect_garbage()
            why = f"shadow not stored: {exc}"
            store.record_outcome(Outcome(result="rejected", version=slot.version, reason=why))
            raise RejectedError(why) from exc
        store.clear_journal()
        store.record_outcome(
            Outcome(result="shadow", version=slot.version, reason="held as shadow candidate")
        )
    log.info("ota: %s v%d held as shadow candidate", slot.name, slot.version)
    return slot
