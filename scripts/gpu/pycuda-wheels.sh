#!/bin/bash
# Run on a development machine (with network), in the repository root: fetches pycuda's source
# release and the pure-Python/cp312 wheels it needs into .whl/ (ignored by git), for a GPU
# machine that cannot download anything.
set -euo pipefail
mkdir -p .whl
python3 -m pip download -q --no-deps --no-build-isolation --no-binary pycuda -d .whl pycuda==2026.1
for p in pytools==2026.1.1 mako platformdirs siphash24; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl "$p"
done
ls -la .whl
