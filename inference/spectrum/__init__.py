"""The OMIS spectrum (defined in ``docs/spectrum.md``): integer-exact on CPU and GPU."""

from inference.spectrum.backends import (
    BACKENDS,
    NumpyBackend,
    SpectrumBackend,
    compute_spectrum,
    open_backend,
    slide_histogram,
)
from inference.spectrum.params import (
    ALGORITHMS,
    RbhistParams,
    SpectrumParams,
    WdiffParams,
    parse_params,
)
from inference.spectrum.types import Histogram, Spectrum, axis_nm, finalize, smooth

__all__ = [
    "ALGORITHMS",
    "BACKENDS",
    "Histogram",
    "NumpyBackend",
    "RbhistParams",
    "Spectrum",
    "SpectrumBackend",
    "SpectrumParams",
    "WdiffParams",
    "axis_nm",
    "compute_spectrum",
    "finalize",
    "open_backend",
    "parse_params",
    "slide_histogram",
    "smooth",
]
