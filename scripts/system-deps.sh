#!/usr/bin/env bash
# Installs the system binaries that the tests and the demo talk to, when missing.
# Idempotent: prints nothing and does nothing when everything is present.
#   scripts/system-deps.sh          what the demo needs (the MQTT broker)
#   scripts/system-deps.sh --test   plus what the tests need (mosquitto clients, Chromium,
#                                   PostgreSQL)
set -euo pipefail
mode=${1:-}
need=()
command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || need+=(mosquitto)
if [ "$mode" = --test ]; then
  command -v mosquitto_sub >/dev/null 2>&1 || need+=(mosquitto-clients)
  # Headless browser for the dashboard test; Playwright never downloads one.
  [ -x /usr/bin/chromium ] || need+=(chromium)
  # systemd-analyze verifies the unit files (tests/test_deploy_units.py)
  command -v systemd-analyze >/dev/null 2>&1 || need+=(systemd)
  # A real PostgreSQL for the archive's tests (clusters are created in temp dirs by the tests)
  compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || need+=(postgresql)
fi
if ((${#need[@]})); then
  if [ "$(id -u)" != 0 ]; then
    echo "missing system packages: ${need[*]} (run as root or install them: apt-get install ${need[*]})" >&2
    exit 1
  fi
  echo "installing system packages: ${need[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
