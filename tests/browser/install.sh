#!/usr/bin/env bash
# Installs what the console's browser tests need: Debian's chromium (apt) and playwright-core
# (npm, pinned by package-lock.json). Outside CI a missing piece is reported and the browser
# tests skip with the same reason; in CI (CI=true) it fails the build instead.
set -uo pipefail
cd "$(dirname "$0")"

give_up() {
  echo "browser tests: $1" >&2
  if [ "${CI:-}" = "true" ]; then exit 1; fi
  echo "browser tests: they will be skipped" >&2
  exit 0
}

chromium="${CHROMIUM:-/usr/bin/chromium}"
if [ ! -x "$chromium" ]; then
  if [ "$(id -u)" = 0 ]; then sudo=""; elif sudo -n true 2>/dev/null; then sudo="sudo -n"; else sudo="none"; fi
  if ! command -v apt-get >/dev/null || [ "$sudo" = "none" ]; then
    give_up "$chromium is missing and apt-get cannot install it here (needs root)"
  fi
  echo "browser tests: installing chromium with apt-get (once)"
  log="$(mktemp)"
  if ! { $sudo apt-get update -q && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q chromium; } \
      >"$log" 2>&1; then
    tail -20 "$log" >&2
    give_up "apt-get install chromium failed"
  fi
fi

command -v npm >/dev/null || give_up "npm is missing (node 18+ is needed)"
if [ ! -d node_modules/playwright-core ] || [ package-lock.json -nt node_modules/.package-lock.json ]; then
  npm ci --no-audit --no-fund --loglevel=error || give_up "npm ci failed"
fi
