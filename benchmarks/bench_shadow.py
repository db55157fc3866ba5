"""Per-slide latency with and without a shadow candidate (issue 24 §1).

    .venv/bin/python benchmarks/bench_shadow.py [--slides 6] [--fields 4] [--size 320x240]
                                                [--repeats 5] [--backend onnxruntime]

The device path of one slide, fields already in memory (acquisition excluded, so the shares
below are upper bounds of what a real microscope's slide sees):

  serving   run_slide (spectrum + QC of every field, slide spectrum, render, preprocess,
            infer, decide) and the result report: the latency to the serving result
  shadow    the same, then the candidate's classify_slide_spectrum on the slide's spectrum and its
            report (what the appliance does after committing the serving result)

Runs alternate (serving, shadow / shadow, serving: ABBA) slide by slide and repeat --repeats
times; the table gives medians per slide and the ratios of the same run.  Two numbers matter:
the serving result's latency with a shadow held (the shadow runs after it is committed: ratio
~1) and the shadow's share of the slide cycle (median of per-slide shadow / serving time: the
load of a shared machine moves whole cycles by more than the shadow costs).
Without --bundle two tiny bundles are built with tests/fakes/bundles.py.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from inference.backends import BackendOptions
from inference.bundle import Bundle, load_bundle
from inference.golden import open_checked
from inference.pipeline import PipelineConfig, SlidePipeline
from inference.selftest import simulated_slide
from inference.spectrum import open_backend


def _bundles(serving: str | None, candidate: str | None, tmp: Path) -> tuple[Bundle, Bundle]:
    if serving and candidate:
        return load_bundle(serving), load_bundle(candidate)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from fakes.bundles import make_bundle  # type: ignore[import-not-found]

    a: Bundle = make_bundle(tmp / "serving", seed=1, version=1)
    b: Bundle = make_bundle(tmp / "candidate", seed=2, version=2)
    return a, b


def _pipeline(bundle: Bundle, backend: str, spectra: Any, tmp: str) -> SlidePipeline:
    engine, _ = open_checked(backend, bundle, BackendOptions(state_dir=tmp))
    return SlidePipeline(bundle, engine, PipelineConfig(spectrum_backend=spectra))


def _one(serving: SlidePipeline, shadow: SlidePipeline | None, slide: list[Any]) -> list[float]:
    """(ms to the serving report, ms of the whole slide cycle, ms of the shadow part)."""
    t0 = time.perf_counter()
    result = serving.run_slide(slide)
    result.report()
    t1 = time.perf_counter()
    if shadow is not None:
        shadow.classify_slide_spectrum(result.spectrum, result.fields).report()
    t2 = time.perf_counter()
    return [(t1 - t0) * 1e3, (t2 - t0) * 1e3, (t2 - t1) * 1e3]


def main() -> int:
    """Run the benchmark and print the table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", help="serving bundle (with --candidate)")
    ap.add_argument("--candidate", help="shadow candidate bundle (same spectrum parameters)")
    ap.add_argument("--backend", default="onnxruntime")
    ap.add_argument("--spectrum-backend", default="auto")
    ap.add_argument("--slides", type=int, default=6)
    ap.add_argument("--fields", type=int, default=4)
    ap.add_argument("--size", default="320x240")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    w, h = (int(v) for v in args.size.split("x"))
    with tempfile.TemporaryDirectory() as tmp:
        a, b = _bundles(args.bundle, args.candidate, Path(tmp))
        spectra = open_backend(args.spectrum_backend)
        serving = _pipeline(a, args.backend, spectra, tmp)
        shadow = _pipeline(b, args.backend, spectra, tmp)
        if shadow.params != serving.params:
            ap.error("the candidate's spectrum parameters differ from the serving bundle's")
        data = [list(simulated_slide(s, args.fields, (w, h))) for s in range(args.slides)]
        _one(serving, shadow, data[0])  # warm-up, not measured
        plain: list[list[float]] = []
        with_shadow: list[list[float]] = []
        for r in range(args.repeats):
            for i, slide in enumerate(data):  # alternate (ABBA), so order and load even out
                if (r + i) % 2:
                    with_shadow.append(_one(serving, shadow, slide))
                    plain.append(_one(serving, None, slide))
                else:
                    plain.append(_one(serving, None, slide))
                    with_shadow.append(_one(serving, shadow, slide))
        serving.backend.close()
        shadow.backend.close()
        spectra.close()
    p, s = np.median(np.array(plain), axis=0), np.median(np.array(with_shadow), axis=0)
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs (a shared machine)")
    print(
        f"{args.slides} slides x {args.fields} fields of {w}x{h}, {args.repeats} repeats, "
        f"backend {args.backend}, spectrum {spectra.name}; medians per slide"
    )
    print(f"{'':34}{'no shadow':>12}{'shadow held':>14}{'ratio':>9}")
    print(f"{'latency to the serving result ms':34}{p[0]:12.2f}{s[0]:14.2f}{s[0] / p[0]:9.3f}")
    print(f"{'slide cycle (serving + shadow) ms':34}{p[1]:12.2f}{s[1]:14.2f}{s[1] / p[1]:9.3f}")
    print(f"{'shadow classification alone ms':34}{'':12}{s[2]:14.2f}")
    # The paired share (shadow part / serving part of the same slide) is robust to the load
    # of a shared machine, which moves both cycle medians by more than the shadow costs.
    paired = np.array([r[2] / r[0] for r in with_shadow])
    print(
        f"shadow share of the slide cycle: {float(np.median(paired)):.1%} (median of per-slide "
        f"shadow/serving; from the cycle medians {(s[1] - p[1]) / p[1]:+.1%})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
