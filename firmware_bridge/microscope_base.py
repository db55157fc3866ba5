"""The microscope seam: something that yields W/P field pairs, and recording them to disk.

:class:`Microscope` is the base of every microscope that
:func:`firmware_bridge.microscope.open_microscope` returns (hardware and simulated ones in
:mod:`firmware_bridge.microscope`, recordings in :mod:`firmware_bridge.replay`).  It sits in its
own module so that the opener module imports the implementations and the implementations import
the base, without any two modules importing each other.
"""

from __future__ import annotations

import abc
import json
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

from firmware_bridge.acquisition import (
    AcquisitionSettings,
    FieldPair,
    QualityCheck,
    ScanPlan,
    make_plan,
    prefetched,
    utc_now,
)
from firmware_bridge.exceptions import InputError
from firmware_bridge.fsutil import atomic_directory, atomic_write_text
from firmware_bridge.images import write_png

SCHEMA = "omis.acquisition/1"
_MT = TypeVar("_MT", bound="Microscope")


class Microscope(abc.ABC):
    """Something that yields field pairs; a context manager with an idempotent close()."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._closed = False

    def __enter__(self: _MT) -> _MT:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Release everything; idempotent."""
        if not self._closed:
            self._closed = True
            self._close()

    def acquire_fields(
        self,
        plan: ScanPlan,
        settings: AcquisitionSettings | None = None,
        *,
        qc: QualityCheck | None = None,
        prefetch: int = 0,
    ) -> Iterator[FieldPair]:
        """Yield one :class:`FieldPair` per field of ``plan``.

        With ``prefetch > 0`` acquisition runs that many fields ahead on a worker thread, so
        the next field is taken while the caller computes on the current one.
        """
        source = self._acquire(plan, settings or AcquisitionSettings(), qc)
        return prefetched(source, prefetch) if prefetch > 0 else source

    def default_plan(self, fields: int, pattern: str = "serpentine") -> ScanPlan:
        """A plan of ``fields`` fields suited to this microscope."""
        return make_plan(fields=fields, pattern=pattern)

    @abc.abstractmethod
    def describe(self) -> dict[str, Any]:
        """JSON-ready identity: kind, URL, firmware, camera settings, slide."""

    @abc.abstractmethod
    def _acquire(
        self, plan: ScanPlan, settings: AcquisitionSettings, qc: QualityCheck | None
    ) -> Iterator[FieldPair]: ...

    @abc.abstractmethod
    def _close(self) -> None: ...


def _software_version() -> str:
    from importlib import metadata

    try:
        return metadata.version("omis-edge")
    except metadata.PackageNotFoundError:
        return "unknown"


def record_acquisition(
    microscope: Microscope,
    plan: ScanPlan,
    out: str | Path,
    settings: AcquisitionSettings | None = None,
    qc: QualityCheck | None = None,
) -> dict[str, Any]:
    """Acquire ``plan`` into ``out`` (which must not exist): PNG pairs + ``acquisition.json``.

    The directory appears complete or not at all.  Returns the metadata written.
    """
    settings = settings or AcquisitionSettings()
    target = Path(out)
    if target.exists():
        raise InputError(f"{target} already exists; choose a new output directory")
    started = utc_now()
    fields: list[dict[str, Any]] = []
    with atomic_directory(target) as tmp:
        for pair in microscope.acquire_fields(plan, settings, qc=qc):
            names = {
                "diffuse": f"field-{pair.index:03d}-diffuse.png",
                "polarized": f"field-{pair.index:03d}-polarized.png",
            }
            write_png(tmp / names["diffuse"], pair.diffuse)
            write_png(tmp / names["polarized"], pair.polarized)
            fields.append({**pair.metadata(), **names})
        meta = {
            "schema": SCHEMA,
            "started_at": started,
            "finished_at": utc_now(),
            "software": {"name": "omis-edge", "version": _software_version()},
            "microscope": microscope.describe(),
            "plan": plan.model_dump(mode="json"),
            "settings": settings.model_dump(mode="json"),
            "fields": fields,
        }
        atomic_write_text(
            tmp / "acquisition.json", json.dumps(meta, indent=2, allow_nan=False) + "\n"
        )
    return meta
