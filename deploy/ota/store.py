"""The on-device model store: which verified bundle serves, which one came before, and why.

Layout under ``<state-dir>/models/``::

    state.json      StoreState: current, previous, pending flag, last outcome, generation
    journal.json    the install in progress (absent when none); written before/after each step
    bundles/<v>-<hash>-<txn>/   unpacked, verified bundles; immutable once placed
    staging/<txn>/  work area of an install; anything here after a restart is garbage
    .lock           flock held by whoever changes the store

The one atomic switch is ``os.replace`` of ``state.json`` (fsynced): a reader sees either the
old or the new state, never a mix.  Bundle directories never move after they are placed, so
``current`` and ``previous`` are just names in ``state.json``.  See ``docs/ota.md`` for the
recovery rules of :meth:`ModelStore.recover`.  The records of ``state.json`` and their reader are
in :mod:`inference.store_state`, shared with ``omis infer`` (which may not import deploy).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, Field

from deploy.ota.exceptions import StoreError
from deploy.ota.signing import load_checked
from firmware_bridge.fsutil import atomic_write_text
from inference.bundle import Bundle
from inference.exceptions import ModelStoreError
from inference.store_state import (  # the records are shared with the device CLI's reader
    BUNDLES_DIR,
    MODELS_DIR,
    STATE_FILE,
    Outcome,
    Record,
    Slot,
    StoreState,
    read_record,
    read_state,
    slot_path,
)

# Outcome, Slot and StoreState are defined beside the shared reader and are part of this API.
__all__ = ["JOURNAL_FILE", "STATE_FILE", "Journal", "ModelStore", "Outcome", "Slot", "StoreState"]

log = logging.getLogger(__name__)

JOURNAL_FILE = "journal.json"
STAGING_DIR = "staging"
LOCK_FILE = ".lock"
STATE_SCHEMA = "omis.ota_state/1"

M = TypeVar("M", bound=BaseModel)


class Journal(Record):
    """The install in progress."""

    txn: str = Field(pattern=r"^[0-9a-f]{8,32}$")
    step: str
    candidate: Slot | None = None


class ModelStore:
    """The model store under ``<state_dir>/models`` (no I/O until a method is called)."""

    def __init__(self, state_dir: Path) -> None:
        self.root = Path(state_dir) / MODELS_DIR
        self._mutex = threading.RLock()
        self._lock_fd: int | None = None
        self._lock_depth = 0

    # -- reading (no lock needed: state.json is replaced atomically) ---------------------------

    def read_state(self) -> StoreState:
        """The committed-to-disk state (empty when nothing was ever installed)."""
        try:
            return read_state(self.root)
        except ModelStoreError as exc:
            raise StoreError(str(exc)) from exc

    def read_journal(self) -> Journal | None:
        """The journal of an install in progress or interrupted, if any."""
        return _read_model(self.root / JOURNAL_FILE, Journal)

    def generation(self) -> int:
        """Grows on every switch; a service compares it at slide boundaries to reload."""
        return self.read_state().generation

    def bundle_path(self, slot: Slot) -> Path:
        """Directory of an installed bundle."""
        try:
            return slot_path(self.root, slot.dir)
        except ModelStoreError as exc:
            raise StoreError(str(exc)) from exc

    def open_slot(self, slot: Slot) -> Bundle:
        """Load an installed bundle, re-verifying every file and the recorded manifest."""
        bundle = load_checked(self.bundle_path(slot))
        if hashlib.sha256(bundle.manifest_bytes).hexdigest() != slot.manifest_sha256:
            raise StoreError(f"{slot.dir}: manifest differs from the one installed")
        return bundle

    def active(self) -> Bundle | None:
        """The bundle that should serve now (verified), or None when none is installed."""
        current = self.read_state().current
        return None if current is None else self.open_slot(current)

    def state(self) -> dict[str, Any]:
        """The ``ota/state`` payload: versions, model hashes, pending install, last outcome."""
        st = self.read_state()
        journal = self.read_journal()
        pending: Slot | None = st.current if st.pending else None
        if pending is None and journal is not None and journal.candidate is not None:
            pending = journal.candidate
        return {
            "schema": STATE_SCHEMA,
            "current": st.current.version if st.current else None,
            "previous": st.previous.version if st.previous else None,
            "pending": pending.version if pending else None,
            "last_outcome": st.last_outcome.model_dump() if st.last_outcome else None,
            "generation": st.generation,
            "models": {
                "current": st.current.describe() if st.current else None,
                "previous": st.previous.describe() if st.previous else None,
                "pending": pending.describe() if pending else None,
            },
            "step": journal.step if journal else None,
        }

    # -- locking -------------------------------------------------------------------------------

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the store's exclusive lock (re-entrant in this object); fails fast if busy."""
        with self._mutex:
            if self._lock_depth == 0:
                self._lock_fd = _acquire(self.root / LOCK_FILE)
            self._lock_depth += 1
            try:
                yield
            finally:
                self._lock_depth -= 1
                if self._lock_depth == 0 and self._lock_fd is not None:
                    os.close(self._lock_fd)  # closing releases the flock
                    self._lock_fd = None

    # -- writing (callers hold the lock) --------------------------------------------------------

    def write_state(self, state: StoreState) -> None:
        """Replace ``state.json`` atomically and durably."""
        _write_model(self.root / STATE_FILE, state)

    def write_journal(self, journal: Journal) -> None:
        """Replace ``journal.json`` atomically and durably."""
        _write_model(self.root / JOURNAL_FILE, journal)

    def clear_journal(self) -> None:
        """Remove the journal (the install is finished or undone)."""
        (self.root / JOURNAL_FILE).unlink(missing_ok=True)

    def staging_path(self, txn: str) -> Path:
        """Work directory of install ``txn``."""
        return self.root / STAGING_DIR / txn

    def record_outcome(self, outcome: Outcome) -> None:
        """Store the last outcome without touching current/previous."""
        with self.lock():
            self.write_state(self.read_state().model_copy(update={"last_outcome": outcome}))

    def activate(self, slot: Slot) -> StoreState:
        """Switch: ``slot`` becomes current (pending), current becomes previous."""
        with self.lock():
            st = self.read_state()
            new = StoreState(
                generation=st.generation + 1,
                current=slot,
                previous=st.current,
                pending=True,
                last_outcome=st.last_outcome,
            )
            self.write_state(new)
            log.info("switched to %s v%d (pending health period)", slot.name, slot.version)
            return new

    def commit(self) -> StoreState:
        """Accept the pending current model; drop bundles no longer referenced."""
        with self.lock():
            st = self.read_state()
            if not st.pending or st.current is None:
                raise StoreError("nothing to commit: no model is pending")
            new = st.model_copy(
                update={
                    "pending": False,
                    "last_outcome": Outcome(result="committed", version=st.current.version),
                }
            )
            self.write_state(new)
            self.clear_journal()
            self.collect_garbage()
            log.info("committed %s v%d", st.current.name, st.current.version)
            return new

    def rollback(self, reason: str) -> StoreState:
        """Go back to the previous model (verified first); the current one is dropped."""
        with self.lock():
            st = self.read_state()
            if st.current is None or (st.previous is None and not st.pending):
                raise StoreError("nothing to roll back to: no previous model")
            if st.previous is not None:
                self.open_slot(st.previous)  # refuse to switch to a damaged bundle
            new = StoreState(
                generation=st.generation + 1,
                current=st.previous,
                previous=None,
                pending=False,
                last_outcome=Outcome(
                    result="rolled_back", version=st.current.version, reason=reason
                ),
            )
            self.write_state(new)
            self.clear_journal()
            self.collect_garbage()
            log.warning("rolled back from v%d: %s", st.current.version, reason)
            return new

    def collect_garbage(self) -> None:
        """Delete staging leftovers and bundles that no state or journal refers to."""
        with self.lock():
            st = self.read_state()
            journal = self.read_journal()
            keep = {s.dir for s in (st.current, st.previous) if s is not None}
            if journal is not None and journal.candidate is not None:
                keep.add(journal.candidate.dir)
            for path in _children(self.root / BUNDLES_DIR):
                if path.name not in keep:
                    shutil.rmtree(path, ignore_errors=True)
            for path in _children(self.root / STAGING_DIR):
                if journal is None or path.name != journal.txn:
                    shutil.rmtree(path, ignore_errors=True)

    def recover(self) -> str | None:
        """Finish or undo whatever a restart interrupted; returns what it did (None: nothing).

        Rules: a model still pending at start-up is rolled back (its health period was cut
        short by the restart, which counts as a failure); an install interrupted before its
        switch is undone; a switch already committed only loses its journal.
        """
        with self.lock():
            st = self.read_state()
            journal = self.read_journal()
            action: str | None = None
            if st.pending:
                self.rollback("restarted before the health period completed")
                action = "rolled_back"
            elif journal is not None:
                action = self._undo_or_finish(st, journal)
            self.collect_garbage()
            return action

    def _undo_or_finish(self, st: StoreState, journal: Journal) -> str:
        cand = journal.candidate
        if cand is not None and st.current is not None and st.current.dir == cand.dir:
            self.clear_journal()  # killed after the commit was written
            return "committed"
        self.clear_journal()
        self.write_state(
            st.model_copy(
                update={
                    "last_outcome": Outcome(
                        result="interrupted",
                        version=cand.version if cand else None,
                        reason=f"install interrupted at step {journal.step!r}; nothing changed",
                    )
                }
            )
        )
        return "interrupted"


def _acquire(path: Path) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise StoreError(
            f"{path.parent}: another OTA operation is in progress (store locked)"
        ) from None
    return fd


def _children(path: Path) -> list[Path]:
    return sorted(path.iterdir()) if path.is_dir() else []


def _read_model(path: Path, cls: type[M]) -> M | None:
    try:
        return read_record(path, cls)
    except ModelStoreError as exc:
        raise StoreError(str(exc)) from exc


def _write_model(path: Path, model: BaseModel) -> None:
    atomic_write_text(path, model.model_dump_json(indent=2) + "\n")
