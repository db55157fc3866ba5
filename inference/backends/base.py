"""The inference backend seam: one small interface, one module per implementation.

A backend turns a float32 N×C×H×W batch (already preprocessed with
:func:`inference.preprocess.to_tensor`) into float32 N×K class probabilities.  The public methods
here validate state and input and time the call (a template method, as in Polygraphy's runners);
each subclass fills in one private step per method: :meth:`_load`, :meth:`_infer`,
:meth:`_describe` and :meth:`_close`.
"""

from __future__ import annotations

import logging
import threading
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field, replace
from types import TracebackType
from typing import Any, ClassVar, Literal

import numpy as np
import numpy.typing as npt

from inference.bundle import Bundle
from inference.exceptions import BackendUnavailableError, InferenceError
from inference.integrity import check_probabilities

log = logging.getLogger(__name__)

F32 = npt.NDArray[np.float32]
Precision = Literal["fp32", "fp16"]
PRECISIONS: tuple[Precision, ...] = ("fp32", "fp16")


@dataclass(frozen=True)
class BackendOptions:
    """Everything a backend may be configured with; each backend reads the fields it knows."""

    precision: Precision | None = None
    max_batch: int = 8
    opt_batch: int = 1
    min_batch: int = 1
    state_dir: str | None = None
    provider: str = "cpu"
    threads: int | None = None
    device: str = "cpu"
    workspace_mb: int = 1024
    dla_core: int | None = None
    version_compatible: bool = False
    cuda_graph: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.precision is not None and self.precision not in PRECISIONS:
            raise InferenceError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if not 1 <= self.min_batch <= self.opt_batch <= self.max_batch:
            raise InferenceError(
                "need 1 <= min_batch <= opt_batch <= max_batch, got "
                f"{self.min_batch}/{self.opt_batch}/{self.max_batch}"
            )

    def with_precision(self, precision: Precision) -> BackendOptions:
        """A copy with another precision (the FP32 fallback of the golden gate)."""
        return replace(self, precision=precision)


class InferenceBackend(ABC):
    """Base of every backend: state checks, input checks, timing; subclasses do one step each.

    Thread safety: one call at a time per backend (a lock serialises :meth:`infer`), which is
    what the pipeline needs: one classify stage owns the backend.
    """

    name: ClassVar[str] = "base"
    #: precisions this backend can run, the first being its default when none is asked for.
    precisions: ClassVar[tuple[Precision, ...]] = ("fp32",)

    def __init__(self, options: BackendOptions | None = None) -> None:
        self.options = options or BackendOptions()
        self._bundle: Bundle | None = None
        self._closed = False
        self._lock = threading.Lock()
        self._degraded_reason: str | None = None
        self._requested = self.name
        self._skipped: tuple[str, ...] = ()
        self._chw: tuple[int, int, int] = (0, 0, 0)
        self._classes = 0
        self.load_ms = 0.0
        self.last_infer_ms = 0.0
        self.calls = 0

    # -- public template methods -------------------------------------------------------------

    def load(self, bundle: Bundle) -> InferenceBackend:
        """Load the bundle's model; returns ``self`` so ``load_backend`` can chain."""
        self._check_open()
        if self._bundle is not None:
            raise InferenceError(f"{self.name}: a model is already loaded; open a new backend")
        if self.options.precision is not None and self.options.precision not in self.precisions:
            raise BackendUnavailableError(
                f"{self.name} cannot run {self.options.precision} "
                f"(supports {', '.join(self.precisions)})"
            )
        shape = bundle.manifest.input.shape
        self._chw = (shape[1], shape[2], shape[3])
        self._classes = len(bundle.manifest.classes)
        t0 = time.perf_counter()
        self._load(bundle)
        self.load_ms = (time.perf_counter() - t0) * 1e3
        self._bundle = bundle
        log.info("%s: loaded %s in %.1f ms", self.name, bundle.manifest.name, self.load_ms)
        return self

    def warmup(self, batch_sizes: tuple[int, ...] | None = None) -> None:
        """Run zeros through every batch size the pipeline uses, so the first slide is not slow."""
        sizes = batch_sizes or tuple(sorted({self.options.min_batch, self.options.opt_batch}))
        for n in sizes:
            self.infer(np.zeros((n, *self._chw), dtype=np.float32))

    def infer(self, batch: F32) -> F32:
        """Probabilities (float32 N×K) for a float32 N×C×H×W batch."""
        self._check_loaded()
        self._check_batch(batch)
        with self._lock:
            t0 = time.perf_counter()
            out = self._infer(np.ascontiguousarray(batch))
            self.last_infer_ms = (time.perf_counter() - t0) * 1e3
            self.calls += 1
        return self._check_output(out, batch.shape[0])

    def describe(self) -> dict[str, Any]:
        """Name, precision, device or providers, degraded flag; published with every result."""
        info: dict[str, Any] = {
            "name": self.name,
            "precision": self.precision,
            "max_batch": self.options.max_batch,
            "degraded": self._degraded_reason is not None,
            "degraded_reason": self._degraded_reason,
            "requested": self._requested,
        }
        if self._skipped:
            info["skipped"] = list(self._skipped)
        if self._bundle is not None and not self._closed:
            info.update(self._describe())
        return info

    def close(self) -> None:
        """Release the model and device memory; idempotent."""
        if self._closed:
            return
        self._closed = True
        with self._lock:
            self._close()
        log.debug("%s: closed", self.name)

    def mark_degraded(self, reason: str) -> None:
        """Record why this backend serves in a degraded mode (e.g. FP32 after an FP16 failure)."""
        self._degraded_reason = reason

    def mark_selected(self, requested: str, skipped: tuple[str, ...] = ()) -> None:
        """Record that ``requested`` (e.g. ``auto``) chose this backend and what it passed over.

        ``describe()`` and so every result and the status then show that ``auto`` did not get
        its first choice, and why, instead of only naming the backend that runs.
        """
        self._requested = requested
        self._skipped = skipped

    @property
    def precision(self) -> Precision:
        """The precision this backend runs at (asked for, else its default)."""
        return self.options.precision or self.precisions[0]

    @property
    def requested(self) -> str:
        """The backend name that was asked for (``auto`` or this backend's own name)."""
        return self._requested

    @property
    def skipped(self) -> tuple[str, ...]:
        """Why ``auto`` passed over earlier candidates (empty when it got its first choice)."""
        return self._skipped

    @property
    def degraded(self) -> bool:
        """True when :meth:`mark_degraded` was called."""
        return self._degraded_reason is not None

    @property
    def bundle(self) -> Bundle:
        """The loaded bundle."""
        self._check_open()
        if self._bundle is None:
            raise InferenceError(f"{self.name}: no model loaded (call load(bundle) first)")
        return self._bundle

    @property
    def input_chw(self) -> tuple[int, int, int]:
        """C, H, W of the network input."""
        return self._chw

    def __enter__(self) -> InferenceBackend:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- checks ------------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise InferenceError(f"{self.name}: backend is closed")

    def _check_loaded(self) -> None:
        self._check_open()
        if self._bundle is None:
            raise InferenceError(f"{self.name}: no model loaded (call load(bundle) first)")

    def _check_batch(self, batch: object) -> None:
        if not isinstance(batch, np.ndarray):
            raise InferenceError(f"{self.name}: expected a numpy array, got {type(batch).__name__}")
        if batch.dtype != np.float32:
            raise InferenceError(f"{self.name}: expected float32 input, got {batch.dtype}")
        if batch.ndim != 4 or tuple(batch.shape[1:]) != self._chw:
            raise InferenceError(
                f"{self.name}: expected input shape (N, {', '.join(map(str, self._chw))}), "
                f"got {tuple(batch.shape)}"
            )
        n = batch.shape[0]
        if not 1 <= n <= self.options.max_batch:
            raise InferenceError(
                f"{self.name}: batch size {n} outside 1..{self.options.max_batch} (max_batch)"
            )

    def _check_output(self, out: object, n: int) -> F32:
        arr = np.asarray(out)
        if arr.shape != (n, self._classes):
            raise InferenceError(
                f"{self.name}: model returned shape {arr.shape}, expected {(n, self._classes)}"
            )
        check_probabilities("infer", arr, self._classes)
        return arr.astype(np.float32, copy=False)

    # -- the steps subclasses implement ------------------------------------------------------

    @abstractmethod
    def _load(self, bundle: Bundle) -> None:
        """Load the model; raise BackendUnavailableError if this backend cannot run here."""

    @abstractmethod
    def _infer(self, batch: F32) -> F32:
        """Run one validated, contiguous batch."""

    @abstractmethod
    def _describe(self) -> dict[str, Any]:
        """Backend-specific details (providers, device, engine file…)."""

    @abstractmethod
    def _close(self) -> None:
        """Release resources; called once."""
