#!/usr/bin/env bash
# Rates systemd/keyexportd.service with systemd-analyze (offline) and fails above the
# ceiling (issue: 2.0 or lower). Prints the score.
set -euo pipefail
cd "$(dirname "$0")/.."
ceiling=${1:-2.0}
out=$(systemd-analyze security --offline=yes --no-pager systemd/keyexportd.service 2>&1)
score=$(printf '%s\n' "$out" | sed -n 's/.*Overall exposure level for keyexportd.service: \([0-9.]*\).*/\1/p')
if [ -z "$score" ]; then
  printf '%s\n' "$out" >&2
  echo "could not read the exposure level" >&2
  exit 1
fi
echo "systemd-analyze security: keyexportd.service exposure $score (ceiling $ceiling)"
awk -v s="$score" -v c="$ceiling" 'BEGIN { exit !(s <= c) }' || {
  printf '%s\n' "$out" | grep -v '^✓' >&2
  echo "exposure $score is above $ceiling" >&2
  exit 1
}
