"""Spectrum plots for people (``omis spectrum --plot``, reports, the demo).

Not the CNN's input: that is :mod:`inference.render`, which must be byte-stable.  These plots use
matplotlib's object API on the Agg canvas (no pyplot global state, no display needed) and are
written atomically, so an error never leaves a partial file.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Sequence
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from firmware_bridge.fsutil import atomic_write_bytes
from inference.exceptions import SpectrumInputError
from inference.spectrum.types import Spectrum

log = logging.getLogger(__name__)

FORMATS = ("png", "svg", "pdf")
_Y_LABEL = {
    "omis-wdiff-v1": "W − P intensity per valid pixel",
    "omis-rbhist-v1": "(h_W − h_P) per valid pixel",
}


def check_plot_path(out_path: str | Path) -> str:
    """The plot format implied by the file's suffix; SpectrumInputError if unsupported."""
    out_path = Path(out_path)
    fmt = out_path.suffix.lstrip(".").lower()
    if fmt not in FORMATS:
        raise SpectrumInputError(
            f"{out_path}: unsupported plot format {fmt or '(none)'!r}; use one of "
            f"{', '.join('.' + f for f in FORMATS)}"
        )
    return fmt


def _pixels(s: Spectrum) -> str:
    share = 100.0 * s.valid_pixels / s.total_pixels if s.total_pixels else 0.0
    return f"{s.valid_pixels:,} of {s.total_pixels:,} pixels valid ({share:.1f}%)"


def _save(fig: Figure, out_path: Path) -> Path:
    buf = io.BytesIO()
    FigureCanvasAgg(fig)
    fig.savefig(buf, format=check_plot_path(out_path), dpi=fig.dpi)
    path = atomic_write_bytes(out_path, buf.getvalue())
    log.info("spectrum plot written to %s", path)
    return path


def plot_spectra(
    spectra: Sequence[tuple[str, Spectrum]], out_path: str | Path, title: str | None = None
) -> Path:
    """Overlay several labelled spectra in one plot; written atomically (.png, .svg or .pdf)."""
    if not spectra:
        raise SpectrumInputError("nothing to plot: no spectra given")
    out = Path(out_path)
    check_plot_path(out)  # fail before drawing anything
    fig = Figure(figsize=(7.0, 4.2), dpi=120, layout="constrained")
    ax = fig.add_subplot()
    for label, s in spectra:
        ax.plot(s.x_nm, s.y, linewidth=1.4, label=label)
    ax.axhline(0.0, color="0.6", linewidth=0.8)
    first = spectra[0][1]
    ax.set_xlabel("wavelength difference (nm)")
    ax.set_ylabel(_Y_LABEL.get(first.algorithm, "spectrum"))
    ax.grid(True, alpha=0.3)
    if len(spectra) > 1:
        ax.legend(fontsize="small")
    ax.set_title(title or f"{first.algorithm}", fontsize="medium")
    return _save(fig, out)


def plot_spectrum(spectrum: Spectrum, out_path: str | Path, title: str | None = None) -> Path:
    """Plot one spectrum (axis in nm, title with the algorithm and pixel counts), atomically."""
    heading = title or f"{spectrum.algorithm} ({spectrum.backend})\n{_pixels(spectrum)}"
    if spectrum.flags:
        heading += f" — flags: {', '.join(spectrum.flags)}"
    return plot_spectra([(spectrum.algorithm, spectrum)], out_path, heading)
