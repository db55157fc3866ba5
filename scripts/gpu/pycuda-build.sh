#!/bin/bash
# Run on the GPU machine, in the repository root, with .whl/ carried there (see
# pycuda-wheels.sh): installs pycuda's dependencies into /tmp/site and builds pycuda in
# /tmp/pycuda-2026.1 (about 2 minutes). Then: export PYTHONPATH=/tmp/pycuda-2026.1:/tmp/site
set -euo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
tar xzf .whl/pycuda-2026.1.tar.gz -C /tmp
cd /tmp/pycuda-2026.1
SECONDS=0
python3 setup.py -q build_ext --inplace -j "$(nproc)" > /tmp/pycuda-build.log 2>&1 || { tail -20 /tmp/pycuda-build.log; exit 1; }
echo "pycuda built in ${SECONDS}s"
