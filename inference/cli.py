"""Subcommands of ``omis`` contributed by this package (see ``deploy/cli.py``).

Each subcommand registers itself in its own ``_register_<name>`` function called from
:func:`register`, so several engineers can add commands without touching each other's code.
Heavy imports (matplotlib) happen inside handlers, only when needed.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from inference.exceptions import SpectrumInputError

if TYPE_CHECKING:
    from inference.spectrum.qc import SlideSpectrum

log = logging.getLogger(__name__)

SPECTRUM_BACKENDS = ("auto", "numpy", "cuda")


def register(sub: argparse._SubParsersAction[Any], common: argparse.ArgumentParser) -> None:
    """Add this package's subcommands to ``omis``."""
    _register_spectrum(sub, common)


# --- omis spectrum -------------------------------------------------------------------------


def _register_spectrum(
    sub: argparse._SubParsersAction[Any], common: argparse.ArgumentParser
) -> None:
    p = sub.add_parser(
        "spectrum",
        parents=[common],
        help="compute the OMIS spectrum of one or more W/P fields",
        description="Compute the OMIS spectrum of one field (W.png P.png) or of several "
        "(repeated --field W P), with per-field quality control.  Fields that fail QC are "
        "reported and left out of the spectrum; if none passes, the command fails.",
    )
    p.add_argument("pair", nargs="*", metavar="IMAGE", help="W.png P.png (diffuse, polarized)")
    p.add_argument(
        "--field",
        nargs=2,
        action="append",
        default=[],
        metavar=("W", "P"),
        help="one more field pair (repeatable)",
    )
    p.add_argument("--algorithm", help="spectrum algorithm (default omis-wdiff-v1)")
    p.add_argument("--params", metavar="JSON", help="spectrum parameters: a JSON object, or @FILE")
    p.add_argument(
        "--backend",
        default="auto",
        choices=SPECTRUM_BACKENDS,
        help="auto prefers CUDA when usable; a named backend never falls back (default auto)",
    )
    p.add_argument("--json", action="store_true", help="print the spectrum as JSON on stdout")
    p.add_argument("--plot", metavar="OUT.png", help="also draw the spectrum (.png/.svg/.pdf)")
    p.add_argument(
        "--min-valid-fraction",
        type=float,
        metavar="F",
        help="reject fields with fewer valid pixels than this fraction (default 0.25)",
    )
    p.add_argument(
        "--qc", metavar="JSON", help="QC thresholds: a JSON object, or @FILE (see docs/spectrum.md)"
    )
    p.set_defaults(handler=spectrum_command)


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number here (numbers must be finite; strict JSON)")


def json_object_arg(value: str | None, option: str) -> dict[str, Any]:
    """A JSON object given inline or as @FILE; errors name the option."""
    if value is None:
        return {}
    text = value
    if value.startswith("@"):
        path = Path(value[1:])
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise SpectrumInputError(f"{option}: cannot read {path}: {exc.strerror}") from exc
    try:
        data = json.loads(text, parse_constant=_refuse_constant)
    except json.JSONDecodeError as exc:
        raise SpectrumInputError(f"{option}: not valid JSON ({exc.msg} at char {exc.pos})") from exc
    except (ValueError, RecursionError) as exc:
        raise SpectrumInputError(f"{option}: {exc}") from exc
    if not isinstance(data, dict):
        raise SpectrumInputError(f"{option}: expected a JSON object, got {type(data).__name__}")
    return data


def _field_paths(args: argparse.Namespace) -> list[tuple[Path, Path]]:
    if len(args.pair) not in (0, 2):
        raise SpectrumInputError(
            f"expected two images (W.png P.png), got {len(args.pair)}: {' '.join(args.pair)}"
        )
    pairs = [tuple(args.pair)] if args.pair else []
    pairs += [tuple(f) for f in args.field]
    if not pairs:
        raise SpectrumInputError("no field given: pass W.png P.png or --field W P")
    return [(Path(w), Path(p)) for w, p in pairs]


def _summary(result: SlideSpectrum) -> str:
    """A few human lines: algorithm, pixels, peak and trough, and each field's verdict."""
    s = result.spectrum
    share = 100.0 * s.valid_pixels / s.total_pixels if s.total_pixels else 0.0
    hi, lo = int(s.y.argmax()), int(s.y.argmin())
    lines = [
        f"{s.algorithm} on {s.backend}: {len(result.used)} of {len(result.fields)} field(s) "
        f"used, {s.valid_pixels:,} of {s.total_pixels:,} pixels valid ({share:.1f}%)",
        f"peak {s.y[hi]:+.4g} at {s.x_nm[hi]:+.1f} nm, trough {s.y[lo]:+.4g} at "
        f"{s.x_nm[lo]:+.1f} nm" + (f"; flags: {', '.join(s.flags)}" if s.flags else ""),
    ]
    for q in result.fields:
        why = f" ({', '.join(q.reasons)})" if q.reasons else ""
        lines.append(
            f"  field {q.index}: {q.verdict}{why}  valid {q.valid_fraction:.3f}  "
            f"focus {q.focus:.3g}  shift {q.shift_px:.2f}px"
        )
    return "\n".join(lines)


def spectrum_command(args: argparse.Namespace) -> int:
    """``omis spectrum``: read the fields, compute with QC, optionally plot, print."""
    from firmware_bridge.images import read_rgb
    from inference.spectrum.params import parse_params
    from inference.spectrum.qc import compute_slide_spectrum, qc_thresholds_from_json

    paths = _field_paths(args)
    params = parse_params(json_object_arg(args.params, "--params"), args.algorithm)
    qc = json_object_arg(args.qc, "--qc")
    if args.min_valid_fraction is not None:
        qc["min_valid_fraction"] = args.min_valid_fraction
    thresholds = qc_thresholds_from_json(qc)
    if args.plot:
        from inference.plot import check_plot_path

        check_plot_path(args.plot)  # fail before the work, not after it
    fields = [(read_rgb(w), read_rgb(p)) for w, p in paths]
    result = compute_slide_spectrum(fields, params, args.backend, thresholds)
    if args.plot:
        from inference.plot import plot_spectrum

        plot_spectrum(result.spectrum, args.plot)
    if args.json:
        print(json.dumps(result.to_json(), allow_nan=False))
    else:
        print(_summary(result))
    return 0
