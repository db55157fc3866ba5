"""Device-side subcommands of ``omis``: ``infer``, ``bench``, ``engine build|list``, ``selftest``.

Thin: each handler parses, calls the library (pipeline, golden gate, engine cache, selftest)
and formats.  Results go to stdout (``--json`` for machines), logs to stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from inference.backends import BACKEND_NAMES, BackendOptions
from inference.bundle import Bundle, load_bundle
from inference.exceptions import GoldenMismatchError, InferenceError
from inference.state_dir import resolve_state_dir
from inference.store_state import active_bundle_path

SPECTRUM_BACKENDS = ("auto", "numpy", "cuda")


def _out(text: str) -> None:
    sys.stdout.write(text + "\n")


def state_dir(args: argparse.Namespace) -> Path:
    """The state directory (:func:`inference.state_dir.resolve_state_dir`)."""
    return resolve_state_dir(getattr(args, "state_dir", None))


def _bundle(args: argparse.Namespace) -> Bundle:
    path = Path(args.bundle) if args.bundle else active_bundle_path(state_dir(args))
    return load_bundle(path)


def _options(args: argparse.Namespace) -> BackendOptions:
    return BackendOptions(
        precision=getattr(args, "precision", None),
        max_batch=getattr(args, "max_batch", 8),
        opt_batch=min(getattr(args, "opt_batch", 1), getattr(args, "max_batch", 8)),
        state_dir=str(state_dir(args)),
        provider=getattr(args, "ort_provider", "cpu"),
        workspace_mb=getattr(args, "workspace_mb", 1024),
        dla_core=getattr(args, "dla_core", None),
        version_compatible=getattr(args, "version_compatible", False),
        cuda_graph=getattr(args, "cuda_graph", False),
        device=getattr(args, "device", "cpu"),
    )


def _add_backend_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bundle", help="model bundle directory (default: the active model)")
    p.add_argument("--backend", choices=BACKEND_NAMES, default="auto", help="inference backend")
    p.add_argument("--precision", choices=("fp16", "fp32"), help="default: the backend's own")
    p.add_argument(
        "--ort-provider",
        choices=("cpu", "cuda", "tensorrt"),
        default="cpu",
        help="onnxruntime execution provider (asked for explicitly; never a fallback)",
    )
    p.add_argument(
        "--spectrum-backend",
        choices=SPECTRUM_BACKENDS,
        default="auto",
        help="where the spectrum is computed (default auto: CUDA when usable, else numpy)",
    )
    p.add_argument("--cuda-graph", action="store_true", help="tensorrt: replay a CUDA graph")
    p.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default="cpu",
        help="torch backend: where it runs (cuda without a GPU is an error, never a fallback)",
    )
    p.add_argument("--json", action="store_true", help="machine-readable output on stdout")


def _pipeline(args: argparse.Namespace, bundle: Bundle) -> Any:
    from inference.golden import open_checked
    from inference.pipeline import PipelineConfig, SlidePipeline

    spectrum = args.spectrum_backend
    backend, _ = open_checked(args.backend, bundle, _options(args), spectrum_backend=spectrum)
    return SlidePipeline(bundle, backend, PipelineConfig(spectrum_backend=args.spectrum_backend))


# ---------------------------------------------------------------------------------- infer ----


def _field_pairs(args: argparse.Namespace) -> list[tuple[str, str]]:
    paths = list(args.images)
    if len(paths) % 2:
        raise InferenceError("images come in pairs: W.png P.png [W.png P.png …]")
    pairs = [(paths[i], paths[i + 1]) for i in range(0, len(paths), 2)]
    pairs += [(str(w), str(p)) for w, p in args.field or []]
    if not pairs:
        raise InferenceError("no field given: pass W.png P.png or --field W P")
    return pairs


def _read_fields(pairs: list[tuple[str, str]]) -> Any:
    from firmware_bridge.images import read_rgb

    for i, (w, p) in enumerate(pairs):
        yield i, read_rgb(w), read_rgb(p)


def cmd_infer(args: argparse.Namespace) -> int:
    """Classify one slide from its field image pairs."""
    pairs = _field_pairs(args)
    bundle = _bundle(args)
    pipe = _pipeline(args, bundle)
    try:
        result = pipe.run_slide(_read_fields(pairs))
    finally:
        pipe.backend.close()
    data = result.to_json()
    if args.json:
        _out(json.dumps(data, allow_nan=False))
        return 0
    if data["abstained"]:  # no call: say why, with the value and the limit, and the leaning
        _out(f"label      none  ABSTAINED ({data['reason']}, leans {data['side']})")
        _out(f"reason     {data['reason_text']}")
    else:
        _out(f"label      {data['label']}  (risk {data['risk']}, p(high) {data['p_high']:.3f})")
    _out("probs      " + ", ".join(f"{k} {v:.3f}" for k, v in data["probabilities"].items()))
    _out(f"model      {data['model']['name']} v{data['model']['version']}")
    b = data["backend"]
    _out(f"backend    {b['name']} {b['precision']}" + (" DEGRADED" if b["degraded"] else ""))
    for q in data["fields"]:
        checks = "; ".join(c["text"] for c in q["checks"]) or " ".join(q["reasons"])
        _out(f"field {q['index']:<4} {q['verdict']} {checks}")
    _out("timings_ms " + ", ".join(f"{k} {v:.1f}" for k, v in data["timings_ms"].items()))
    return 0


# ---------------------------------------------------------------------------------- bench ----


def _size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must be WxH, got {text!r}") from None
    if w < 16 or h < 16:
        raise argparse.ArgumentTypeError("size must be at least 16x16")
    return w, h


def cmd_bench(args: argparse.Namespace) -> int:
    """Per-stage latency and throughput of the pipeline on simulated slides (without faults)."""
    from inference.pipeline import timing_stats
    from inference.selftest import simulated_slide

    bundle = _bundle(args)
    pipe = _pipeline(args, bundle)
    try:
        # fault-free fields: a short simulated slide of only faulty fields would end the run
        pipe.run_slide(simulated_slide(999, 1, args.size, faults=False))  # warm-up, not measured
        slides = (
            simulated_slide(s, args.fields, args.size, faults=False) for s in range(args.slides)
        )
        t0 = time.perf_counter()
        results = list(pipe.run(slides))
        stats = timing_stats(results, time.perf_counter() - t0)
    finally:
        pipe.backend.close()
    stats.update(
        backend=results[0].backend,
        spectrum_backend=results[0].spectrum_backend,
        size=list(args.size),
    )
    if args.json:
        _out(json.dumps(stats, allow_nan=False))
        return 0
    _out(
        f"{stats['slides']} slides x {args.fields} fields of {args.size[0]}x{args.size[1]}; "
        f"backend {stats['backend']['name']}, spectrum {stats['spectrum_backend']}"
    )
    _out(f"{'stage':<11}{'median ms':>11}{'p95 ms':>11}")
    for stage, s in stats["stages"].items():
        _out(f"{stage:<11}{s['median_ms']:>11.2f}{s['p95_ms']:>11.2f}")
    _out(f"throughput {stats['slides_per_s']:.2f} slides/s, {stats['fields_per_s']:.2f} fields/s")
    return 0


# --------------------------------------------------------------------------------- engine ----


def cmd_engine_build(args: argparse.Namespace) -> int:
    """Build (or find in the cache) the TensorRT engine of a bundle and pass the golden gate."""
    from inference.backends import load_backend
    from inference.golden import golden_report
    from inference.golden_path import check_device_path

    bundle = _bundle(args)
    with load_backend("tensorrt", bundle, _options(args)) as backend:
        report = golden_report(backend, bundle)
        if report.passed:  # the engine must also reproduce the whole device path
            try:
                path = check_device_path(backend, bundle, args.spectrum_backend)
                report = replace(report, path=path.to_json())
            except GoldenMismatchError as exc:
                report = replace(report, invalid=f"device path: {exc}")
        info = {"backend": backend.describe(), "golden": report.to_json()}
    if args.json:
        _out(json.dumps(info, allow_nan=False))
    else:
        _out(f"engine  {info['backend']['engine']}")
        _out(f"golden  {'PASS' if report.passed else 'FAIL'}  {report.summary()}")
    return 0 if report.passed else 1


def cmd_engine_list(args: argparse.Namespace) -> int:
    """List the engines in the cache."""
    from inference.engine_cache import EngineCache

    entries = EngineCache(state_dir(args)).entries()
    if args.json:
        _out(json.dumps(entries, allow_nan=False))
        return 0
    for e in entries:
        k = e["key"]
        _out(
            f"{k['onnx_sha256'][:12]} {k['precision']} TRT {k['trt_version']} "
            f"{k['gpu_name']} sm{k['compute_capability']} batch {k['max_shape'][0]}"
        )
    return 0


# ------------------------------------------------------------------------------- selftest ----


def cmd_selftest(args: argparse.Namespace) -> int:
    """Quick on-device acceptance; exits non-zero listing the failed checks."""
    from inference.selftest import run_selftest

    bundle = _bundle(args)
    report = run_selftest(
        bundle, args.backend, options=_options(args), spectrum_backend=args.spectrum_backend
    )
    if args.json:
        _out(json.dumps(report.to_json(), allow_nan=False))
    else:
        for c in report.checks:
            _out(f"{'PASS' if c.passed else 'FAIL'}  {c.name:<9} {c.ms:8.1f} ms  {c.detail}")
    if not report.passed:
        sys.stderr.write(f"omis selftest: failed checks: {', '.join(report.failed)}\n")
        return 1
    return 0


def register(sub: argparse._SubParsersAction[Any], common: argparse.ArgumentParser) -> None:
    """Add this package's subcommands to ``omis``."""
    p = sub.add_parser(
        "infer",
        parents=[common],
        help="classify one slide from W/P image pairs",
        description="Classify one slide from its W/P field pairs with a model bundle (default: "
        "the active model of the state dir's model store): QC, spectrum, render, network.",
    )
    p.add_argument("images", nargs="*", metavar="IMG", help="W.png P.png of the first field")
    p.add_argument("--field", nargs=2, action="append", metavar=("W", "P"), help="another field")
    _add_backend_args(p)
    p.set_defaults(handler=cmd_infer)

    p = sub.add_parser(
        "bench",
        parents=[common],
        help="per-stage latency and throughput",
        description="Run the device pipeline on simulated slides and report each stage's median "
        "and p95 latency and the throughput.",
    )
    _add_backend_args(p)
    p.add_argument("--size", type=_size, default=(320, 240), help="field size WxH")
    p.add_argument("--fields", type=int, default=4, help="fields per slide")
    p.add_argument("--slides", type=int, default=5, help="slides to run")
    p.set_defaults(handler=cmd_bench)

    p = sub.add_parser(
        "engine",
        parents=[common],
        help="TensorRT engines: build, list",
        description="TensorRT engines, built on the device from a bundle's model.onnx and cached "
        "under the state dir.",
    )
    esub = p.add_subparsers(dest="engine_command", metavar="ACTION", required=True)
    b = esub.add_parser(
        "build",
        parents=[common],
        help="build and cache the engine of a bundle",
        description="Build (or find in the cache) the TensorRT engine of a bundle and run the "
        "golden check; exits 0 only if it passes.",
    )
    b.add_argument("--bundle", help="model bundle directory (default: the active model)")
    b.add_argument("--precision", choices=("fp16", "fp32"), default="fp16", help="engine precision")
    b.add_argument("--max-batch", type=int, default=8, help="largest batch the engine accepts")
    b.add_argument("--opt-batch", type=int, default=1, help="batch size TensorRT optimises for")
    b.add_argument(
        "--workspace-mb", type=int, default=1024, help="TensorRT builder workspace in MiB"
    )
    b.add_argument("--dla-core", type=int, help="build for this DLA core, GPU fallback on")
    b.add_argument(
        "--version-compatible",
        action="store_true",
        help="build a version-compatible plan (loads on later TensorRT versions)",
    )
    b.add_argument(
        "--spectrum-backend",
        choices=SPECTRUM_BACKENDS,
        default="auto",
        help="spectrum backend for the golden field pairs",
    )
    b.add_argument("--json", action="store_true", help="machine-readable output on stdout")
    b.set_defaults(handler=cmd_engine_build)
    ls = esub.add_parser(
        "list",
        parents=[common],
        help="list cached engines",
        description="List the engines cached under the state dir, with their cache keys.",
    )
    ls.add_argument("--json", action="store_true", help="machine-readable output on stdout")
    ls.set_defaults(handler=cmd_engine_list)

    p = sub.add_parser(
        "selftest",
        parents=[common],
        help="quick on-device acceptance checks",
        description="Quick on-device acceptance: the backend starts, reproduces the bundle's "
        "golden outputs and classifies a simulated slide; exits non-zero naming failed checks.",
    )
    _add_backend_args(p)
    p.set_defaults(handler=cmd_selftest)
