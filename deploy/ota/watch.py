"""Notice every change of the model store, whoever made it (the daemon, ``omis ota install``).

The store changes only by ``os.replace`` of ``state.json`` or ``journal.json`` (or the journal's
removal), so the (inode, mtime, size) of those two files is a complete change signature.  The
daemon polls it and republishes the retained ``ota/state`` when it moves: a local install or
rollback while the daemon runs is never left stale on the broker.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable

from deploy.ota.store import JOURNAL_FILE, STATE_FILE, ModelStore

log = logging.getLogger(__name__)

Signature = tuple[tuple[int, int, int] | None, ...]


def store_signature(store: ModelStore) -> Signature:
    """(inode, mtime ns, size) of ``state.json`` and ``journal.json`` (None: absent)."""
    out: list[tuple[int, int, int] | None] = []
    for name in (STATE_FILE, JOURNAL_FILE):
        try:
            st = os.stat(store.root / name)
        except FileNotFoundError:
            out.append(None)
            continue
        out.append((st.st_ino, st.st_mtime_ns, st.st_size))
    return tuple(out)


class StoreWatcher:
    """Calls ``on_change`` whenever the store's signature moves (a supervised worker)."""

    def __init__(
        self, store: ModelStore, on_change: Callable[[], None], interval_s: float = 0.5
    ) -> None:
        self.store = store
        self.on_change = on_change
        self.interval_s = interval_s

    def run(self, stop: threading.Event) -> None:
        """Poll until ``stop`` is set (waits on the event: no busy loop)."""
        last = store_signature(self.store)
        while not stop.wait(self.interval_s):
            now = store_signature(self.store)
            if now != last:
                last = now
                log.debug("ota: model store changed; republishing ota/state")
                self.on_change()
