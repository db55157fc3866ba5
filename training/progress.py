"""Progress bars on stderr (rich), or nothing at all: the library never prints."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import TracebackType

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
from rich.progress import Progress as RichProgress

Tick = Callable[[int, int], None]


class Progress:
    """A context manager showing one bar per task on stderr; ``enabled=False`` shows nothing."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self._bars: RichProgress | None = None

    def __enter__(self) -> Progress:
        if self.enabled and self._bars is None:
            self._bars = RichProgress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                console=Console(stderr=True),
                transient=False,
            )
            self._bars.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Stop drawing; safe to call more than once."""
        if self._bars is not None:
            self._bars.stop()
            self._bars = None

    @contextmanager
    def task(self, description: str) -> Iterator[Tick]:
        """A bar for one task; the yielded function takes (done, total)."""
        bars = self._bars
        if bars is None:
            yield lambda _done, _total: None
            return
        task_id = bars.add_task(description, total=None)

        def tick(done: int, total: int) -> None:
            bars.update(task_id, completed=done, total=total)

        try:
            yield tick
        finally:
            # a finished task shows as complete even when its last step did not report
            total = next((t.total for t in bars.tasks if t.id == task_id), None)
            if total is not None:
                bars.update(task_id, completed=total)
