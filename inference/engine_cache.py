"""TensorRT engines as derived, disposable files under ``<state-dir>/engines/``.

An engine is valid only for the exact ONNX model, TensorRT version, GPU (name and compute
capability), precision and shape profile it was built for.  Those make the :class:`EngineKey`;
its hash names the file.  Each engine is a plain TensorRT plan (``trtexec --loadEngine`` and
DeepStream can read it) with a JSON sidecar describing the key; the sidecar is written last, so
a plan without its sidecar is an interrupted write and is ignored.  A plan that does not
deserialise (stale, corrupt, other TensorRT) is removed and rebuilt; the service never crashes
on it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, ValidationError

from firmware_bridge.exceptions import InputError
from firmware_bridge.fsutil import atomic_write_bytes, atomic_write_text
from firmware_bridge.limits import is_identifier
from firmware_bridge.paths import safe_join
from inference.exceptions import EngineError

log = logging.getLogger(__name__)

T = TypeVar("T")
ENGINE_DIR = "engines"
SIDECAR_SCHEMA = "omis.engine/1"
MAX_SIDECAR_BYTES = 64 * 1024  # a real sidecar is well under 1 KiB; bigger is not ours


class _KeyModel(BaseModel):
    """The key as the sidecar stores it: exact types, no extras (a damaged file fails here)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    onnx_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    trt_version: StrictStr
    gpu_name: StrictStr
    compute_capability: StrictStr
    precision: StrictStr
    min_shape: list[StrictInt]
    opt_shape: list[StrictInt]
    max_shape: list[StrictInt] = Field(min_length=1)
    dla_core: StrictInt | None = None
    version_compatible: bool = False


class Sidecar(BaseModel):
    """``<stem>.json`` beside a plan; extra fields (build info) are kept."""

    model_config = ConfigDict(extra="allow", strict=True)

    schema_: Literal["omis.engine/1"] = Field(alias="schema")
    key: _KeyModel
    plan_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    plan_bytes: int = Field(ge=0)


class SidecarError(ValueError):
    """A sidecar that cannot be read as one: the entry is invalid (and removed)."""


def read_sidecar(path: Path) -> Sidecar:
    """Parse a sidecar file; any damage (truncated, binary, deep, wrong types) is one
    :class:`SidecarError` with a one-line reason, never a traceback."""
    if not path.is_file():  # a directory, FIFO or device named *.json: never opened
        raise SidecarError("not a regular file")
    try:
        with path.open("rb") as fh:
            data = fh.read(MAX_SIDECAR_BYTES + 1)
    except OSError as exc:
        raise SidecarError(f"unreadable ({exc.strerror})") from exc
    if len(data) > MAX_SIDECAR_BYTES:
        raise SidecarError(f"larger than {MAX_SIDECAR_BYTES} bytes")
    try:
        # pydantic-core parses with a recursion limit: deep JSON is a ValidationError.
        return Sidecar.model_validate_json(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "file"
        raise SidecarError(f"{where}: {err['msg']}") from exc


@dataclass(frozen=True)
class EngineKey:
    """Everything an engine depends on; two builds with equal keys are interchangeable."""

    onnx_sha256: str
    trt_version: str
    gpu_name: str
    compute_capability: str
    precision: str
    min_shape: tuple[int, ...]
    opt_shape: tuple[int, ...]
    max_shape: tuple[int, ...]
    dla_core: int | None = None
    version_compatible: bool = False

    def to_json(self) -> dict[str, Any]:
        """The key as a JSON object (lists for shapes)."""
        data = asdict(self)
        for k in ("min_shape", "opt_shape", "max_shape"):
            data[k] = list(data[k])
        return data

    @classmethod
    def from_sidecar(cls, side: Sidecar) -> EngineKey:
        """The key a validated sidecar describes."""
        return cls.from_json(side.key.model_dump())

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> EngineKey:
        """Inverse of :meth:`to_json`; raises KeyError/TypeError on a malformed object."""
        fields = dict(data)
        for k in ("min_shape", "opt_shape", "max_shape"):
            fields[k] = tuple(int(v) for v in fields[k])
        return cls(**fields)

    def digest(self) -> str:
        """sha256 of the canonical JSON of the key."""
        canon = json.dumps(self.to_json(), sort_keys=True, separators=(",", ":"), allow_nan=False)
        return hashlib.sha256(canon.encode("utf-8")).hexdigest()

    def file_stem(self) -> str:
        """Readable and unique: model hash prefix, precision, key hash prefix."""
        if not is_identifier(self.precision):
            raise EngineError(f"engine key precision {self.precision!r} cannot name a file")
        if not is_identifier(self.onnx_sha256[:12]):
            raise EngineError(f"engine key onnx_sha256 {self.onnx_sha256!r} cannot name a file")
        return f"{self.onnx_sha256[:12]}-{self.precision}-{self.digest()[:16]}"


class EngineCache:
    """Engine plans on disk, keyed by :class:`EngineKey`."""

    def __init__(self, state_dir: str | os.PathLike[str]) -> None:
        self.root = Path(state_dir) / ENGINE_DIR

    def plan_path(self, key: EngineKey) -> Path:
        """Where the plan for ``key`` lives."""
        return self._path(key.file_stem(), ".plan")

    def sidecar_path(self, key: EngineKey) -> Path:
        """Where the description of ``key`` lives."""
        return self._path(key.file_stem(), ".json")

    def _path(self, stem: str, suffix: str) -> Path:
        try:
            return safe_join(self.root, stem, suffix, what="engine file")
        except InputError as exc:
            raise EngineError(str(exc)) from exc

    def timing_cache_path(self, trt_version: str, gpu_name: str) -> Path:
        """The builder timing cache, shared by builds on one GPU and TensorRT version."""
        safe = "".join(c if c.isalnum() else "_" for c in f"{trt_version}-{gpu_name}")
        return self.root / f"timing-{safe}.cache"

    def load(self, key: EngineKey) -> bytes | None:
        """The plan bytes for ``key``, or None if absent, incomplete or described differently."""
        plan, side = self.plan_path(key), self.sidecar_path(key)
        if not plan.is_file() or not side.is_file():
            return None
        try:
            described = read_sidecar(side)
            if EngineKey.from_sidecar(described) != key:
                raise SidecarError("key differs")
            data = plan.read_bytes()
        except (OSError, SidecarError) as exc:
            log.warning("engine cache: %s unusable (%s); removing it", side.name, exc)
            self.remove(key)
            return None
        if hashlib.sha256(data).hexdigest() != described.plan_sha256:
            log.warning("engine cache: %s does not match its sidecar; removing it", plan.name)
            self.remove(key)
            return None
        return data

    def store(self, key: EngineKey, plan: bytes, info: dict[str, Any] | None = None) -> Path:
        """Write the plan, then its sidecar, both atomically; returns the plan path."""
        path = atomic_write_bytes(self.plan_path(key), plan)
        sidecar = {
            "schema": SIDECAR_SCHEMA,
            "key": key.to_json(),
            "plan_sha256": hashlib.sha256(plan).hexdigest(),
            "plan_bytes": len(plan),
            **(info or {}),
        }
        atomic_write_text(
            self.sidecar_path(key), json.dumps(sidecar, indent=2, sort_keys=True, allow_nan=False)
        )
        return path

    def remove(self, key: EngineKey) -> None:
        """Delete the plan and sidecar of ``key`` (missing files are fine)."""
        for p in (self.sidecar_path(key), self.plan_path(key)):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()

    def entries(self) -> list[dict[str, Any]]:
        """The sidecars of every valid cached engine (for status and ``omis engine``).

        A damaged sidecar makes its entry invalid: one warning line, and the sidecar and its
        plan are removed (engines are derived files; the next build replaces them).
        """
        out = []
        for side in sorted(self.root.glob("*.json")):
            try:
                described = read_sidecar(side)
            except SidecarError as exc:
                log.warning("engine cache: %s is damaged (%s); removing the entry", side.name, exc)
                for path in (side, side.with_suffix(".plan")):
                    with contextlib.suppress(OSError):  # best effort: it is not listed anyway
                        path.unlink(missing_ok=True)
                continue
            out.append(described.model_dump(by_alias=True))
        return out

    def get_or_build(
        self,
        key: EngineKey,
        build: Callable[[], bytes],
        deserialize: Callable[[bytes], T | None],
    ) -> tuple[T, bool]:
        """The deserialised engine for ``key``, building (and caching) it when needed.

        Returns ``(engine, built)``.  A cached plan that does not deserialise is removed and
        rebuilt once; a freshly built plan that does not deserialise raises :class:`EngineError`.
        """
        cached = self.load(key)
        if cached is not None:
            engine = _try_deserialize(deserialize, cached)
            if engine is not None:
                log.info("engine cache: hit %s", self.plan_path(key).name)
                return engine, False
            log.warning(
                "engine cache: %s did not deserialise (stale or corrupt); rebuilding",
                self.plan_path(key).name,
            )
            self.remove(key)
        plan = build()
        engine = _try_deserialize(deserialize, plan)
        if engine is None:
            raise EngineError("a freshly built engine did not deserialise; not caching it")
        self.store(key, plan)
        log.info("engine cache: built and stored %s", self.plan_path(key).name)
        return engine, True


def _try_deserialize(deserialize: Callable[[bytes], T | None], plan: bytes) -> T | None:
    try:
        return deserialize(plan)
    except EngineError as exc:
        log.warning("engine deserialisation failed: %s", exc)
        return None
