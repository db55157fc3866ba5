"""``omis acquire``: capture field pairs from a microscope, with per-field quality control.

It lives on the inference side because the quality control does: ``firmware_bridge`` drives
the microscope and takes a QC hook, and may not import ``inference`` itself.
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


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
    acquire.add_argument(
        "--label",
        metavar="PAP_GROUP",
        help="append the fields to a manifest.csv with this Pap group (II, III, IV, V)",
    )
    acquire.add_argument("--patient", help="with --label: the patient id of the slide")
    acquire.add_argument("--slide-id", help="with --label: the slide id (default: DIR's name)")
    acquire.add_argument(
        "--manifest",
        type=Path,
        help="with --label: the manifest.csv to append to (default: DIR/../manifest.csv)",
    )
    acquire.set_defaults(handler=_acquire)


MANIFEST_HEADER = ("slide_id", "patient_id", "pap_group", "field", "diffuse", "polarized")
PAP_LABELS = {"II": "II", "III": "III", "IV": "IV", "V": "V", "2": "II", "3": "III", "4": "IV"}
PAP_LABELS["5"] = "V"


def _label_plan(args: argparse.Namespace) -> tuple[Path, dict[str, str]] | None:
    """Checked before the microscope is touched: where to append and the slide's labels."""
    from firmware_bridge.exceptions import InputError

    given = [o for o in ("patient", "slide_id", "manifest") if getattr(args, o) is not None]
    if args.label is None:
        if given:
            raise InputError(f"--{given[0].replace('_', '-')} needs --label PAP_GROUP")
        return None
    group = PAP_LABELS.get(args.label.strip().upper().removeprefix("PAP"))
    if group is None:
        raise InputError(f"--label: unknown Pap group {args.label!r} (II, III, IV or V)")
    if not args.patient:
        raise InputError("--label needs --patient ID (the slide's patient)")
    out = Path(args.out).resolve()
    manifest = (args.manifest or out.parent / "manifest.csv").resolve()
    try:
        out.relative_to(manifest.parent)
    except ValueError:
        raise InputError(f"--manifest {manifest}: --out must lie under its directory") from None
    slide = args.slide_id or out.name
    _check_manifest(manifest, slide)
    return manifest, {"slide_id": slide, "patient_id": args.patient, "pap_group": group}


def _check_manifest(manifest: Path, slide: str) -> None:
    import csv

    from firmware_bridge.exceptions import InputError

    if not manifest.is_file():
        return
    with manifest.open(encoding="utf-8", newline="") as fh:
        reader = csv.DictReader(fh)
        header = reader.fieldnames or []
        missing = [c for c in MANIFEST_HEADER if c not in header]
        if missing:
            raise InputError(f"--manifest {manifest}: lacks column(s) {', '.join(missing)}")
        if any(row.get("slide_id") == slide for row in reader):
            raise InputError(f"--manifest {manifest}: slide {slide!r} is already listed")


def append_to_manifest(
    manifest: Path, out: Path, labels: Mapping[str, str], fields: list[dict[str, Any]]
) -> int:
    """Append one row per field (paths relative to the manifest); temp file + rename."""
    import csv
    import io

    from firmware_bridge.fsutil import atomic_write_bytes

    old = manifest.read_text(encoding="utf-8") if manifest.is_file() else ""
    header = next(csv.reader(io.StringIO(old)), None) if old else list(MANIFEST_HEADER)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=header or list(MANIFEST_HEADER), restval="")
    if not old:
        writer.writeheader()
    rel = out.resolve().relative_to(manifest.parent)
    for f in fields:
        writer.writerow(
            {
                **labels,
                "field": f"{int(f['index']):03d}",
                "diffuse": str(rel / f["diffuse"]),
                "polarized": str(rel / f["polarized"]),
            }
        )
    prefix = old if not old or old.endswith("\n") else old + "\n"
    atomic_write_bytes(manifest, (prefix + buf.getvalue()).encode("utf-8"))
    return len(fields)


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
    labelled = _label_plan(args)
    qc = _qc_hook(args.params)
    size = parse_size(args.size) if args.size else None
    with open_microscope(args.microscope, size=size) as scope:
        base = scope.default_plan(args.fields, args.plan)
        extra = {} if args.step_um is None else {"step_um": (args.step_um, args.step_um)}
        plan = make_plan(**{**base.model_dump(), "fields": args.fields, **extra})
        meta = record_acquisition(scope, plan, args.out, qc=qc)
    if labelled is not None:
        n = append_to_manifest(labelled[0], Path(args.out), labelled[1], meta["fields"])
        log.info("appended %d field row(s) of slide %s to %s", n, labelled[1]["slide_id"],
                 labelled[0])  # fmt: skip
    if args.json:
        print(json.dumps(meta, indent=2, allow_nan=False))
    else:
        rejected = [f for f in meta["fields"] if (f.get("qc") or {}).get("verdict") == "reject"]
        print(
            f"wrote {len(meta['fields'])} field pairs and acquisition.json to {args.out}"
            f" ({len(rejected)} rejected by quality control)"
        )
    return 0
