"""``omis acquire``: capture field pairs from a microscope, with per-field quality control.

It lives on the inference side because the quality control does: ``firmware_bridge`` drives
the microscope and takes a QC hook, and may not import ``inference`` itself.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any


def register(sub: argparse._SubParsersAction[Any], common: argparse.ArgumentParser) -> None:
    """Add ``omis acquire``."""
    acquire = sub.add_parser(
        "acquire",
        parents=[common],
        help="capture W/P field pairs and acquisition.json from a microscope",
        description="Capture N field pairs (sim://, serial:///dev/ttyACM0, replay://DIR) into "
        "DIR/field-NNN-{diffuse,polarized}.png plus DIR/acquisition.json, with the quality "
        "control verdict of every field (valid fraction, dark, saturated, focus, registration).",
    )
    acquire.add_argument("--microscope", required=True, help="microscope URL, e.g. sim://?seed=1")
    acquire.add_argument("--fields", type=int, required=True, help="number of fields")
    acquire.add_argument("--out", required=True, help="output directory (must not exist)")
    acquire.add_argument(
        "--plan",
        choices=("grid", "serpentine"),
        default="serpentine",
        help="order in which the stage visits the fields (default serpentine)",
    )
    acquire.add_argument("--size", help="camera frame WIDTHxHEIGHT (default: the camera's)")
    acquire.add_argument("--step-um", type=float, help="distance between fields in µm")
    acquire.add_argument(
        "--params", metavar="JSON", help="spectrum parameters for QC's validity rule, or @FILE"
    )
    acquire.add_argument("--json", action="store_true", help="print acquisition.json on stdout")
    acquire.set_defaults(handler=_acquire)


def _qc_hook(params_json: str | None) -> Callable[[Any], Mapping[str, Any]]:
    from inference.cli import json_object_arg
    from inference.spectrum import parse_params
    from inference.spectrum.qc import assess_field

    params = parse_params(json_object_arg(params_json, "--params"))

    def hook(pair: Any) -> Mapping[str, Any]:
        quality = assess_field(pair.diffuse, pair.polarized, params, index=pair.index)
        return quality.to_json()

    return hook


def _acquire(args: argparse.Namespace) -> int:
    from firmware_bridge.acquisition import make_plan, parse_size
    from firmware_bridge.exceptions import InputError
    from firmware_bridge.microscope import open_microscope
    from firmware_bridge.microscope_base import record_acquisition

    if Path(args.out).exists():
        raise InputError(f"{args.out} already exists; choose a new output directory")
    qc = _qc_hook(args.params)
    size = parse_size(args.size) if args.size else None
    with open_microscope(args.microscope, size=size) as scope:
        base = scope.default_plan(args.fields, args.plan)
        extra = {} if args.step_um is None else {"step_um": (args.step_um, args.step_um)}
        plan = make_plan(**{**base.model_dump(), "fields": args.fields, **extra})
        meta = record_acquisition(scope, plan, args.out, qc=qc)
    if args.json:
        print(json.dumps(meta, indent=2, allow_nan=False))
    else:
        rejected = [f for f in meta["fields"] if (f.get("qc") or {}).get("verdict") == "reject"]
        print(
            f"wrote {len(meta['fields'])} field pairs and acquisition.json to {args.out}"
            f" ({len(rejected)} rejected by quality control)"
        )
    return 0
