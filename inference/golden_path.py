"""The golden gate over the whole device path: field pairs -> spectrum -> image -> tensor -> model.

The tensor-level gate (:mod:`inference.golden`) proves the network; this one proves everything
in front of it with the device's own code: the spectrum backend in use (CUDA or NumPy), the
renderer, the preprocessing and the inference backend.  A bundle carries a few golden field
pairs (``golden/fields/NNN-{diffuse,polarized}.png``, lossless) and, per pair, what the path
must make of them (``golden/path/``)::

    histograms.npy  int64  N×B    spectrum accumulators (exact)
    counts.npy      int64  N×B    pixels per bin (exact)
    pixels.npy      int64  N×2    valid and total pixels (exact)
    images.npy      uint8  N×H×W×3  rendered spectrum image at the render size (exact)
    inputs.npy      float32 N×C×H×W  network input (image or spectrum) (within TENSOR_TOLERANCE)
    outputs.npy     float32 N×K   probabilities (within the manifest's golden tolerance)

:func:`write_path_goldens` makes them at export with the NumPy reference spectrum;
:func:`check_device_path` replays them before a model may serve and raises
:class:`~inference.exceptions.GoldenMismatchError` naming the field and the first stage that
differs.  A bundle without golden field pairs cannot be proven and is refused.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from firmware_bridge.exceptions import BridgeError
from firmware_bridge.images import read_rgb, write_png
from inference.backends.base import InferenceBackend
from inference.bundle import Bundle, InputSpec
from inference.bundle_checks import GOLDEN_PATH_ARRAYS, golden_field_files, load_array
from inference.exceptions import (
    BundleError,
    GoldenMismatchError,
    InvalidValueError,
    SpectrumInputError,
)
from inference.integrity import check_finite
from inference.preprocess import spectrum_to_tensor, to_tensor
from inference.render import RenderParams, render_params_from_json, render_spectrum
from inference.spectrum import NumpyBackend, SpectrumBackend, finalize, parse_params
from inference.spectrum.backends import open_spectrum_backend
from inference.spectrum.params import RbhistParams, WdiffParams
from inference.spectrum.types import Histogram
from inference.spectrum.validate import U8

log = logging.getLogger(__name__)

F32 = npt.NDArray[np.float32]
I64 = npt.NDArray[np.int64]
#: Preprocessing is elementwise IEEE float32 arithmetic: any machine gives the same bits, so
#: only a changed normalisation (or code) can move the tensor by more than this.
TENSOR_TOLERANCE = 1e-6
HISTOGRAMS, COUNTS, PIXELS, IMAGES, INPUTS, OUTPUTS = GOLDEN_PATH_ARRAYS


@dataclass(frozen=True)
class PathGoldens:
    """The golden field pairs of a bundle and what the device path must make of them."""

    pairs: list[tuple[U8, U8]]
    histograms: I64
    counts: I64
    pixels: I64
    images: U8
    inputs: F32
    outputs: F32


@dataclass(frozen=True)
class PathReport:
    """The numbers of one whole-path golden check (it passed: failures raise)."""

    fields: int
    spectrum_backend: str
    max_tensor_diff: float
    max_prob_diff: float
    tolerance: float

    def summary(self) -> str:
        """One line with the numbers."""
        return (
            f"{self.fields} golden field pair(s) through {self.spectrum_backend} spectrum, "
            f"renderer and preprocessing: spectra and images exact, max |Δx| = "
            f"{self.max_tensor_diff:.3g}, max |Δp| = {self.max_prob_diff:.3g} "
            f"(tolerance {self.tolerance:g})"
        )

    def to_json(self) -> dict[str, Any]:
        """For selftest and engine build."""
        return {
            "fields": self.fields,
            "spectrum_backend": self.spectrum_backend,
            "max_tensor_diff": self.max_tensor_diff,
            "max_prob_diff": self.max_prob_diff,
            "tolerance": self.tolerance,
            "passed": True,
        }


def load_path_goldens(bundle: Bundle) -> PathGoldens:
    """Read and check (dtype, shape, finiteness) a bundle's whole-path goldens."""
    m = bundle.manifest
    n = m.golden.fields
    if n == 0:
        raise GoldenMismatchError(
            "the bundle carries no golden field pairs (golden.fields = 0), so this device's "
            "spectrum, renderer and preprocessing cannot be proven on it; re-export the bundle"
        )
    bins = parse_params(m.spectrum).n_bins
    rp, k = render_params_from_json(m.render), len(m.classes)
    c, h, w = m.input.shape[1:]
    root = bundle.root
    return PathGoldens(
        pairs=[_read_pair(root, i) for i in range(n)],
        histograms=load_array(root, HISTOGRAMS, np.int64, (n, bins)),
        counts=load_array(root, COUNTS, np.int64, (n, bins)),
        pixels=load_array(root, PIXELS, np.int64, (n, 2)),
        images=load_array(root, IMAGES, np.uint8, (n, rp.height, rp.width, 3)),
        inputs=load_array(root, INPUTS, np.float32, (n, c, h, w)),
        outputs=load_array(root, OUTPUTS, np.float32, (n, k)),
    )


def _read_pair(root: Path, index: int) -> tuple[U8, U8]:
    names = golden_field_files(index)
    try:
        w, p = (read_rgb(root / name) for name in names)
    except BridgeError as exc:
        raise BundleError(f"golden field {index}: {exc}") from exc
    return w, p


def _field_path(
    pair: tuple[U8, U8],
    params: WdiffParams | RbhistParams,
    render: RenderParams,
    spec: InputSpec,
    spectra: SpectrumBackend,
) -> tuple[Histogram, U8, F32]:
    """One field through the device stages: histogram, rendered image, network input."""
    hist = spectra.histogram(pair[0], pair[1], params)
    spectrum = finalize(hist, params, spectra.name)
    image = render_spectrum(spectrum.x_nm, spectrum.y, render)
    if spec.representation == "spectrum":  # the model reads the vector; the image is still proven
        return hist, image, spectrum_to_tensor([spectrum.y], spec)[0]
    return hist, image, to_tensor([image], spec)[0]


def _compare_field(
    i: int, hist: Histogram, image: U8, tensor: F32, *, g: PathGoldens, backend: str
) -> float:
    """Exact spectrum and image, near-exact tensor; returns the tensor difference."""
    got_pixels = (hist.valid_pixels, hist.total_pixels)
    if not (
        np.array_equal(hist.hist, g.histograms[i])
        and np.array_equal(hist.count, g.counts[i])
        and got_pixels == tuple(int(v) for v in g.pixels[i])
    ):
        raise GoldenMismatchError(
            f"golden field {i}: the {backend} spectrum differs from the bundle's "
            f"(valid/total pixels {got_pixels} vs {tuple(int(v) for v in g.pixels[i])}, "
            f"{int(np.count_nonzero(hist.hist != g.histograms[i]))} histogram bin(s) differ)"
        )
    if not np.array_equal(image, g.images[i]):
        bad = int(np.count_nonzero(np.any(image != g.images[i], axis=-1)))
        raise GoldenMismatchError(f"golden field {i}: rendered image differs in {bad} pixel(s)")
    diff = float(np.max(np.abs(tensor - g.inputs[i])))
    if not diff <= TENSOR_TOLERANCE:
        raise GoldenMismatchError(
            f"golden field {i}: input tensor differs by {diff:.3g} (> {TENSOR_TOLERANCE:g})"
        )
    return diff


def _infer_all(backend: InferenceBackend, tensors: F32) -> F32:
    step = backend.options.max_batch
    try:
        return np.concatenate(
            [backend.infer(tensors[i : i + step]) for i in range(0, len(tensors), step)]
        )
    except InvalidValueError as exc:
        raise GoldenMismatchError(f"golden fields: unusable model outputs ({exc})") from exc


def check_device_path(
    backend: InferenceBackend, bundle: Bundle, spectrum: str | SpectrumBackend = "auto"
) -> PathReport:
    """Replay the golden field pairs through this device's path; raise on any difference."""
    m = bundle.manifest
    g = load_path_goldens(bundle)
    try:
        params, render = parse_params(m.spectrum), render_params_from_json(m.render)
    except SpectrumInputError as exc:
        raise BundleError(f"the device cannot run this bundle: {exc}") from exc
    # A name (a one-off check: selftest, engine build) opens and logs its own; a server passes
    # the backend it serves with, so the gate proves that one and opens nothing.
    spectra = open_spectrum_backend(spectrum) if isinstance(spectrum, str) else spectrum
    try:
        tensors, tensor_diff = [], 0.0
        for i, pair in enumerate(g.pairs):
            try:
                hist, image, tensor = _field_path(pair, params, render, m.input, spectra)
            except (SpectrumInputError, InvalidValueError) as exc:
                raise GoldenMismatchError(f"golden field {i}: {exc}") from exc
            diff = _compare_field(i, hist, image, tensor, g=g, backend=spectra.name)
            tensor_diff = max(tensor_diff, diff)
            tensors.append(tensor)
        name = spectra.name
    finally:
        if isinstance(spectrum, str):
            spectra.close()
    probs = _infer_all(backend, np.stack(tensors))
    tolerance = float(m.golden.tolerance.get(backend.precision, 0.0))
    prob_diff = float(np.max(np.abs(probs - g.outputs)))
    top = np.nonzero(np.argmax(probs, 1) != np.argmax(g.outputs, 1))[0]
    if not prob_diff <= tolerance or top.size:
        raise GoldenMismatchError(
            f"golden fields: {backend.name}/{backend.precision} probabilities differ by "
            f"{prob_diff:.3g} (tolerance {tolerance:g}), top-class mismatches at {top.tolist()}"
        )
    report = PathReport(len(g.pairs), name, tensor_diff, prob_diff, tolerance)
    log.info("device-path golden gate passed: %s", report.summary())
    return report


def _npy(arr: npt.NDArray[Any]) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(arr), allow_pickle=False)
    return buf.getvalue()


def write_path_goldens(
    root: Path,
    pairs: Sequence[tuple[U8, U8]],
    *,
    spectrum: dict[str, Any],
    render: dict[str, Any],
    spec: InputSpec,
    infer: Callable[[F32], F32],
) -> int:
    """Write golden field pairs and their reference path outputs into bundle dir ``root``.

    The reference spectrum is the NumPy backend's; ``infer`` gives probabilities for a float32
    N×C×H×W batch (the exporter's ONNX Runtime).  Returns the number of pairs, for
    ``golden.fields`` in the manifest.
    """
    from firmware_bridge.fsutil import atomic_write_bytes

    params, rp = parse_params(spectrum), render_params_from_json(render)
    ref = NumpyBackend()
    results = [_field_path(pair, params, rp, spec, ref) for pair in pairs]
    tensors = np.stack([t for _, _, t in results])
    outputs = np.asarray(infer(tensors), dtype=np.float32)
    check_finite("golden", outputs, "golden path outputs")
    (root / "golden" / "fields").mkdir(parents=True, exist_ok=True)
    (root / "golden" / "path").mkdir(parents=True, exist_ok=True)
    for i, (w, p) in enumerate(pairs):
        for name, image in zip(golden_field_files(i), (w, p), strict=True):
            write_png(root / name, image)
    arrays: dict[str, npt.NDArray[Any]] = {
        HISTOGRAMS: np.stack([h.hist for h, _, _ in results]).astype(np.int64),
        COUNTS: np.stack([h.count for h, _, _ in results]).astype(np.int64),
        PIXELS: np.array([(h.valid_pixels, h.total_pixels) for h, _, _ in results], np.int64),
        IMAGES: np.stack([im for _, im, _ in results]).astype(np.uint8),
        INPUTS: tensors.astype(np.float32),
        OUTPUTS: outputs,
    }
    for name, arr in arrays.items():
        atomic_write_bytes(root / name, _npy(arr))
    return len(pairs)
