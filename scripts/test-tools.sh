#!/usr/bin/env bash
# Installs the tests' Node tools (tests/tools/fhir-validator: the npm `fhir` package, an FHIR
# validator independent of the Python fhir.resources models) with `npm ci` from the committed
# lock file.  Idempotent and quiet: nothing happens when the tree matches the lock file.
set -euo pipefail
dir="$(cd "$(dirname "$0")/.." && pwd)/tests/tools/fhir-validator"
stamp="$dir/node_modules/.omis-lock-sha256"
want="$(sha256sum "$dir/package-lock.json" | cut -c1-64)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
if ! command -v npm >/dev/null 2>&1; then
  echo "npm is missing: run scripts/dashboard-deps.sh (it installs npm) first" >&2
  exit 1
fi
# --ignore-scripts: the validator needs the package's files only, never install hooks.
(cd "$dir" && npm ci --ignore-scripts --no-audit --no-fund --loglevel=error >/dev/null)
echo "$want" >"$stamp"
