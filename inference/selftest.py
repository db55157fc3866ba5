"""On-device acceptance, quick form (``omis selftest``), and the simulated fields it and
``omis bench`` use.

Checks, each independent, each reported with its numbers:

- ``spectrum``: the configured spectrum backend (CUDA when usable) reproduces the NumPy
  histogram of a small simulated field pair bit for bit;
- ``backend``: the inference backend loads the bundle;
- ``golden``: it reproduces the bundle's golden outputs, and the golden field pairs through the
  device's spectrum backend, renderer and preprocessing (the golden gate, whole path);
- ``slide``: one simulated slide runs end to end through the pipeline.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from firmware_bridge.sim.sample import SimConfig, slide_for
from inference.backends import BackendOptions, InferenceBackend
from inference.bundle import Bundle
from inference.exceptions import InferenceError
from inference.spectrum import NumpyBackend, open_backend, parse_params
from inference.spectrum.validate import U8

log = logging.getLogger(__name__)

FIELD_STEP_UM = 400.0


# The simulator without its rare faulty fields: a benchmark's short slides must all be usable.
WITHOUT_FAULTS = SimConfig(saturated_rate=0, dark_rate=0, defocus_rate=0, misregistration_rate=0)


def simulated_field(
    slide: int, index: int, size: tuple[int, int], seed: int = 0, *, faults: bool = True
) -> tuple[U8, U8]:
    """Field ``index`` of simulated slide ``slide``, from the firmware simulator's sample.

    ``faults=False`` renders the same slide without the simulator's dark, saturated, defocused
    and misregistered fields (a fault-free field looks exactly as with faults on).
    """
    sim = slide_for(slide, seed, config=None if faults else WITHOUT_FAULTS)
    w, p = sim.render_pair(index * FIELD_STEP_UM, 0.0, size=size)
    return w, p


def simulated_slide(
    slide: int, fields: int, size: tuple[int, int], seed: int = 0, *, faults: bool = True
) -> Iterator[tuple[int, U8, U8]]:
    """The fields of one simulated slide, rendered lazily as a microscope would deliver them."""
    for i in range(fields):
        w, p = simulated_field(slide, i, size, seed, faults=faults)
        yield i, w, p


@dataclass
class Check:
    """One selftest check."""

    name: str
    passed: bool = False
    detail: str = ""
    ms: float = 0.0
    data: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """For ``omis selftest --json``."""
        return {
            "name": self.name,
            "passed": self.passed,
            "detail": self.detail,
            "ms": round(self.ms, 3),
            **self.data,
        }


def _run_check(name: str, fn: Callable[[Check], None]) -> Check:
    check = Check(name)
    t0 = time.perf_counter()
    try:
        fn(check)
        check.passed = True
    except (InferenceError, ImportError, OSError, ValueError) as exc:
        check.detail = f"{type(exc).__name__}: {exc}"
    check.ms = (time.perf_counter() - t0) * 1e3
    return check


def check_spectrum(check: Check, backend_name: str, bundle: Bundle) -> None:
    """The spectrum backend matches the NumPy reference on a small simulated pair."""
    params = parse_params(bundle.manifest.spectrum)
    w, p = simulated_field(0, 0, (96, 64))
    backend = open_backend(backend_name)
    try:
        got = backend.histogram(w, p, params)
        check.data["spectrum_backend"] = backend.name
    finally:
        backend.close()
    if not got.equals(NumpyBackend().histogram(w, p, params)):
        raise InferenceError(f"spectrum backend {backend.name} differs from numpy")
    check.detail = f"{backend.name} matches numpy ({got.valid_pixels} valid pixels)"


@dataclass
class SelftestReport:
    """All checks; passed when every one passed."""

    checks: list[Check]

    @property
    def passed(self) -> bool:
        """True when every check passed."""
        return all(c.passed for c in self.checks)

    @property
    def failed(self) -> list[str]:
        """Names of failed checks."""
        return [c.name for c in self.checks if not c.passed]

    def to_json(self) -> dict[str, Any]:
        """For ``omis selftest --json``."""
        return {
            "passed": self.passed,
            "failed": self.failed,
            "checks": [c.to_json() for c in self.checks],
        }


def run_selftest(
    bundle: Bundle,
    backend_name: str = "auto",
    *,
    options: BackendOptions | None = None,
    spectrum_backend: str = "auto",
    fields: int = 2,
    size: tuple[int, int] = (96, 64),
) -> SelftestReport:
    """Run every quick acceptance check; never raises for a failed check."""
    from inference.backends import load_backend
    from inference.golden import gate
    from inference.pipeline import PipelineConfig, SlidePipeline

    state: dict[str, InferenceBackend] = {}
    checks = [_run_check("spectrum", lambda c: check_spectrum(c, spectrum_backend, bundle))]

    def load(c: Check) -> None:
        state["b"] = load_backend(backend_name, bundle, options)
        c.data["backend"] = state["b"].describe()
        c.detail = f"{state['b'].name} loaded in {state['b'].load_ms:.1f} ms"

    def golden(c: Check) -> None:
        if "b" not in state:
            raise InferenceError("no backend loaded")
        report = gate(state["b"], bundle, spectrum_backend)
        c.data["golden"] = report.to_json()
        c.detail = report.summary()

    def slide(c: Check) -> None:
        if "b" not in state:
            raise InferenceError("no backend loaded")
        pipe = SlidePipeline(bundle, state["b"], PipelineConfig(spectrum_backend=spectrum_backend))
        result = pipe.run_slide(simulated_slide(0, fields, size))
        c.data["result"] = {
            k: v for k, v in result.to_json().items() if k not in ("spectrum", "fields")
        }
        c.detail = f"label {result.label}, p(high) {result.p_high:.3f}"

    try:
        checks.append(_run_check("backend", load))
        checks.append(_run_check("golden", golden))
        checks.append(_run_check("slide", slide))
    finally:
        if "b" in state:
            state["b"].close()
    return SelftestReport(checks)
