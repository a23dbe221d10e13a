#!/usr/bin/env bash
# Runs the fault tests and the soak. `--short` is the CI form (debug build, fewer
# rounds, a short outage, no soak); without it, the long forms whose figures go to
# RELIABILITY.md (release build, 20 kill rounds, a 2-minute outage, a 30-minute soak).
set -euo pipefail
cd "$(dirname "$0")"
out=${RELIABILITY_OUT:-../../target/reliability}
mkdir -p "$out"
if [ "${1:-}" = "--short" ]; then
  python3 kill_test.py --rounds 3 --rate 150 --profile debug --out "$out/kill.json"
  python3 outage_test.py --outage 12 --interval 3 --rate 50 --profile debug --out "$out/outage.json"
  if [ "$(id -u)" = 0 ]; then
    python3 disk_full_test.py --full-seconds 3 --profile debug --out "$out/disk-full.json"
  else
    echo "disk-full test skipped: it mounts a tmpfs and needs root" >&2
  fi
else
  # The soak plots with matplotlib; only the long form needs it.
  python3 -c 'import matplotlib' 2>/dev/null ||
    python3 -m pip install --quiet --disable-pip-version-check matplotlib ||
    python3 -m pip install --quiet --disable-pip-version-check --break-system-packages matplotlib
  python3 kill_test.py --rounds 20 --rate 500 --out "$out/kill.json"
  python3 outage_test.py --outage 120 --interval 10 --rate 200 --out "$out/outage.json"
  python3 disk_full_test.py --out "$out/disk-full.json"
  python3 soak.py --minutes 30 --rate 1000 --exporters 5 --png ../../docs/soak.png --out "$out/soak.json"
  python3 report.py "$out" ../../RELIABILITY.md
fi
