"""Quality control against the spectrum, per field, at several sensor sizes; and its verdicts.

    .venv/bin/python benchmarks/bench_qc.py [--sizes 640x480,2448x2048] [--slides 25]
                                            [--fields 2] [--repeats 3]

The simulator (``firmware_bridge/sim/sample.py``) with every fault raised to 20 % renders the
same stage positions at every size (the same cells: its field of view is fixed in µm).  Per
size: the median time of the NumPy spectrum histogram and of ``assess_field`` on the same
fields (best of ``--repeats`` per field: the machine is shared), their ratio (goal: QC <=
spectrum), how many verdicts differ from the simulator's ground truth, and, per fault class,
the range of the focus measure, the shift (as a fraction of the field width) and the
phase-correlation response, from which the thresholds in docs/spectrum.md were chosen.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from functools import partial
from typing import Any

import numpy as np

from firmware_bridge.sim.sample import PAP_GROUPS, SimConfig, SyntheticSlide
from inference.spectrum import NumpyBackend, parse_params
from inference.spectrum.qc import FieldQuality, assess_field

RATES = {"saturated_rate": 0.2, "dark_rate": 0.2, "defocus_rate": 0.2, "misregistration_rate": 0.2}
# what QC must say for each simulated fault; a faulty field may carry further reasons
EXPECTED = {
    "ok": {"exact": ()},
    "misregistered": {"exact": ("misregistered",)},
    "dark": {"includes": ("dark",)},
    "saturated": {"includes": ("saturated",)},
    "defocus": {"includes": ("out_of_focus",)},
}


def _size(text: str) -> tuple[int, int]:
    w, h = (int(v) for v in text.lower().split("x"))
    return w, h


def _right(fault: str, q: FieldQuality) -> bool:
    rule = EXPECTED[fault]
    if "exact" in rule:
        return q.reasons == rule["exact"]
    return set(rule["includes"]) <= set(q.reasons)


def _best_ms(fn: Callable[[], Any], repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best * 1e3


def _measure(size: tuple[int, int], slides: int, fields: int, repeats: int) -> dict[str, Any]:
    params = parse_params()
    backend = NumpyBackend()
    spectrum_ms, qc_ms, wrong = [], [], []
    ranges: dict[str, list[tuple[float, float, float]]] = defaultdict(list)
    for s in range(slides):
        slide = SyntheticSlide(f"qc{s}", PAP_GROUPS[s % 4], 100 + s, SimConfig(**RATES))
        for k in range(fields):
            pos = (1000.0 + 900.0 * k, 700.0 * s)
            fault = slide.field_fault(*pos)
            w, p = slide.render_pair(*pos, size=size)
            h = backend.histogram(w, p, params)
            spectrum_ms.append(_best_ms(partial(backend.histogram, w, p, params), repeats))
            qc_ms.append(_best_ms(partial(assess_field, w, p, params, histogram=h), repeats))
            q = assess_field(w, p, params, histogram=h)
            ranges[fault].append((q.focus, q.shift_fraction, q.registration_response))
            if not _right(fault, q):
                wrong.append(f"slide {s} field {k} ({fault}): {', '.join(q.reasons) or 'ok'}")
    return {
        "spectrum_ms": float(np.median(spectrum_ms)),
        "qc_ms": float(np.median(qc_ms)),
        "wrong": wrong,
        "ranges": {f: np.array(v) for f, v in sorted(ranges.items())},
    }


def main() -> int:
    """Measure and print the tables."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="640x480,1280x1024,2448x2048")
    ap.add_argument("--slides", type=int, default=25)
    ap.add_argument("--fields", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    sizes = [_size(s) for s in args.sizes.split(",")]
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs (a shared machine)")
    print(f"{args.slides} slides x {args.fields} fields, every simulated fault at 20 %")
    print(f"{'size':<11}{'spectrum ms':>12}{'QC ms':>8}{'QC/spec':>9}{'wrong':>7}")
    results = {}
    for size in sizes:
        r = _measure(size, args.slides, args.fields, args.repeats)
        results[size] = r
        ratio = r["qc_ms"] / r["spectrum_ms"]
        print(
            f"{size[0]}x{size[1]:<6}{r['spectrum_ms']:>12.2f}{r['qc_ms']:>8.2f}{ratio:>9.2f}"
            f"{len(r['wrong']):>7}"
        )
    for size, r in results.items():
        print(f"\n{size[0]}x{size[1]}: focus, shift (fraction of width), response per fault")
        for fault, a in r["ranges"].items():
            lo, hi = a.min(axis=0), a.max(axis=0)
            print(
                f"  {fault:<14}n={len(a):<4}focus {lo[0]:.4f}-{hi[0]:.4f}  "
                f"shift {lo[1]:.5f}-{hi[1]:.5f}  response {lo[2]:.2f}-{hi[2]:.2f}"
            )
        for line in r["wrong"]:
            print(f"  WRONG {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
