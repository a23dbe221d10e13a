#!/usr/bin/env bash
# The benchmark suite: builds in release mode, measures every figure beside its ceiling
# in one run and rewrites the figures of BENCHMARKS.md. Installs wrk (Debian) when
# missing. `--quick` is a smoke run of a few seconds (CI); `--no-profile` skips perf.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v wrk >/dev/null; then
  SUDO=""; if [ "$(id -u)" != 0 ] && command -v sudo >/dev/null; then SUDO=sudo; fi
  $SUDO apt-get update -qq
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk
fi
exec python3 scripts/bench/bench.py "$@"
