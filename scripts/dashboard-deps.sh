#!/usr/bin/env bash
# Installs the dashboard's front-end packages (deploy/dashboard/node_modules) with `npm ci`
# from the committed package-lock.json.  Idempotent and quiet: does nothing when the installed
# tree matches the lock file (a stamp holds the lock file's hash).
set -euo pipefail
dir="$(cd "$(dirname "$0")/.." && pwd)/deploy/dashboard"
stamp="$dir/node_modules/.omis-lock-sha256"
want="$(sha256sum "$dir/package-lock.json" | cut -c1-64)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
if ! command -v npm >/dev/null 2>&1; then
  if [ "$(id -u)" != 0 ]; then
    echo "npm is missing (apt-get install npm, or Node.js 18+ with npm)" >&2
    exit 1
  fi
  echo "installing system package: npm" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null
  apt-get install -y -qq --no-install-recommends npm >/dev/null
fi
# --ignore-scripts: the dashboard needs the packages' files only, never their install hooks.
(cd "$dir" && npm ci --ignore-scripts --no-audit --no-fund --loglevel=error >/dev/null)
echo "$want" >"$stamp"
