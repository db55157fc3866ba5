"""Run every benchmark in turn (``make bench``); each prints its own table.

Record the tables, with the machine (``lscpu``), in docs/benchmarks.md.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCHMARKS = (
    ["bench_spectrum.py"],
    ["bench_pipeline.py"],
    ["bench_shadow.py"],
    ["bench_qc.py"],
    ["bench_acquisition.py", "--fields", "30"],
    ["bench_outbox.py"],
    ["bench_train.py"],
    ["bench_operating_point.py", "--repeats", "1"],
)


def main() -> int:
    """Run each benchmark; return non-zero if any failed."""
    failed = []
    for argv in BENCHMARKS:
        print(f"\n=== {' '.join(argv)}", flush=True)
        if subprocess.run([sys.executable, str(HERE / argv[0]), *argv[1:]], check=False).returncode:
            failed.append(argv[0])
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
