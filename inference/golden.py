"""The golden gate: a backend serves only after it reproduces the bundle's golden outputs.

:func:`open_checked` runs both halves: the golden tensors through the backend (here), then the
golden field pairs through the whole device path (:mod:`inference.golden_path`).

Pass means, for every golden input: the maximum absolute probability difference is within the
manifest's tolerance for the backend's precision, nothing is NaN, and the top class is the same.
An FP16 backend that fails is reported; an FP32 one of the same kind serves instead only where
``manifest.golden.allow_fp32_fallback`` allows it, and then it is marked degraded (which
``describe()`` and so the appliance's status and every result show).  Never a silent downgrade.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from inference.backends import BackendOptions, InferenceBackend, load_backend
from inference.bundle import Bundle
from inference.exceptions import (
    BundleError,
    GoldenMismatchError,
    InvalidValueError,
    NonFiniteError,
)
from inference.golden_path import check_device_path
from inference.spectrum import SpectrumBackend

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GoldenReport:
    """The numbers of one golden check."""

    backend: str
    precision: str
    n: int
    max_abs_diff: float
    tolerance: float
    top_class_mismatches: tuple[int, ...]
    nan: bool
    invalid: str = ""  # why the outputs are not usable probabilities (empty: they are)
    path: dict[str, Any] | None = None  # the whole-path check (inference.golden_path), if run

    @property
    def passed(self) -> bool:
        """Within tolerance, no NaN, same top class everywhere."""
        return (
            not self.nan
            and not self.invalid
            and self.max_abs_diff <= self.tolerance
            and not self.top_class_mismatches
        )

    def summary(self) -> str:
        """One line with the numbers."""
        return (
            f"{self.backend}/{self.precision}: max |Δp| = {self.max_abs_diff:.3g} "
            f"(tolerance {self.tolerance:g}) over {self.n} golden inputs, "
            f"top-class mismatches at {list(self.top_class_mismatches)}"
            + (", NaN in outputs" if self.nan else "")
            + (f", invalid outputs ({self.invalid})" if self.invalid else "")
        )

    def to_json(self) -> dict[str, Any]:
        """For selftest and status."""
        return {
            "backend": self.backend,
            "precision": self.precision,
            "n": self.n,
            # Strict JSON: an infinite difference (NaN outputs) is reported as null.
            "max_abs_diff": self.max_abs_diff if math.isfinite(self.max_abs_diff) else None,
            "tolerance": self.tolerance,
            "top_class_mismatches": list(self.top_class_mismatches),
            "nan": self.nan,
            "invalid": self.invalid,
            "path": self.path,
            "passed": self.passed,
        }


def golden_report(backend: InferenceBackend, bundle: Bundle) -> GoldenReport:
    """Run the golden inputs through ``backend`` (in chunks of its max batch) and compare."""
    inputs, expected = bundle.golden()
    tol_map = bundle.manifest.golden.tolerance
    if backend.precision not in tol_map:
        raise BundleError(f"manifest golden.tolerance has no entry for {backend.precision}")
    step = backend.options.max_batch
    try:
        got = np.concatenate(
            [backend.infer(inputs[i : i + step]) for i in range(0, len(inputs), step)]
        )
    except InvalidValueError as exc:
        return GoldenReport(
            backend=backend.name,
            precision=backend.precision,
            n=len(inputs),
            max_abs_diff=math.inf,
            tolerance=float(tol_map[backend.precision]),
            top_class_mismatches=(),
            nan=isinstance(exc, NonFiniteError),
            invalid=exc.detail,
        )
    nan = bool(np.isnan(got).any())
    diffs = np.abs(got - expected)
    # NaN counts as an infinite difference, so the number reported is never hiding it.
    diff = float(np.max(np.where(np.isnan(diffs), np.inf, diffs))) if diffs.size else 0.0
    mism = np.nonzero(np.argmax(np.nan_to_num(got, nan=-1.0), 1) != np.argmax(expected, 1))[0]
    return GoldenReport(
        backend=backend.name,
        precision=backend.precision,
        n=len(inputs),
        max_abs_diff=diff,
        tolerance=float(tol_map[backend.precision]),
        top_class_mismatches=tuple(int(i) for i in mism),
        nan=nan,
    )


def check_golden(backend: InferenceBackend, bundle: Bundle) -> GoldenReport:
    """:func:`golden_report`, raising :class:`GoldenMismatchError` with the numbers on failure."""
    report = golden_report(backend, bundle)
    if not report.passed:
        raise GoldenMismatchError(f"golden outputs not reproduced: {report.summary()}")
    log.info("golden gate passed: %s", report.summary())
    return report


def gate(
    backend: InferenceBackend, bundle: Bundle, spectrum: str | SpectrumBackend = "auto"
) -> GoldenReport:
    """The full gate: golden tensors, then the golden field pairs through the device path."""
    report = check_golden(backend, bundle)
    path = check_device_path(backend, bundle, spectrum)
    return replace(report, path=path.to_json())


def _fp32_fallback(
    failed: InferenceBackend,
    bundle: Bundle,
    options: BackendOptions,
    failure: GoldenMismatchError,
    spectrum: str | SpectrumBackend,
) -> tuple[InferenceBackend, GoldenReport]:
    log.error("FP16 engine failed the golden gate (%s); falling back to FP32, degraded", failure)
    fallback = load_backend(failed.name, bundle, options.with_precision("fp32"))
    # Keep what was asked for (e.g. auto) visible through the fallback.
    fallback.mark_selected(failed.requested, failed.skipped)
    try:
        report = gate(fallback, bundle, spectrum)
    except BaseException:
        fallback.close()
        raise
    fallback.mark_degraded(f"FP16 failed the golden gate ({failure}); serving FP32")
    return fallback, report


def _warmup(backend: InferenceBackend, enabled: bool) -> None:
    if not enabled:
        return
    try:
        backend.warmup()
    except InvalidValueError as exc:
        # Unusable outputs already at warm-up fail the gate like bad golden outputs do.
        raise GoldenMismatchError(f"warm-up outputs are unusable: {exc}") from exc


def open_checked(
    name: str,
    bundle: Bundle,
    options: BackendOptions | None = None,
    warmup: bool = True,
    spectrum_backend: str | SpectrumBackend = "auto",
) -> tuple[InferenceBackend, GoldenReport]:
    """Load a backend, warm it up and pass it through the golden gate before it serves.

    The gate covers the whole device path: ``spectrum_backend`` is the one that will serve.
    """
    opts = options or BackendOptions()
    backend = load_backend(name, bundle, opts)
    try:
        _warmup(backend, warmup)
        return backend, gate(backend, bundle, spectrum_backend)
    except GoldenMismatchError as exc:
        backend.close()
        if backend.precision != "fp16":
            raise
        if not bundle.manifest.golden.allow_fp32_fallback:
            raise GoldenMismatchError(
                f"{exc}; the bundle does not allow an FP32 fallback (golden.allow_fp32_fallback)"
            ) from exc
        return _fp32_fallback(backend, bundle, opts, exc, spectrum_backend)
    except BaseException:
        backend.close()
        raise
