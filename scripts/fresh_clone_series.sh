#!/usr/bin/env bash
# The CI flake check of docs/reliability.md: N consecutive runs of the README's test command, each in a
# fresh clone of this repository's HEAD with a fresh venv, one run at a time. Run nothing heavy beside it:
# CI's machine has 2 cores to itself. One line per run goes to $OUT/summary.txt (commit, exit code,
# seconds, pytest's last line); each run's whole output to $OUT/runN.log.
#   scripts/fresh_clone_series.sh [N=10] [OUT=/tmp/freshseries]
set -u
N=${1:-10}
OUT=${2:-/tmp/freshseries}
REPO=$(cd "$(dirname "$0")/.." && pwd)
WORK=$(mktemp -d)
mkdir -p "$OUT"
for i in $(seq 1 "$N"); do
  dir=$WORK/run$i
  git clone -q "$REPO" "$dir" && cd "$dir" || exit 1
  rev=$(git rev-parse --short HEAD)
  python3 -m venv .venv && . .venv/bin/activate
  started=$(date +%s)
  .ci/run > "$OUT/run$i.log" 2>&1  # CI's command, which is the README's
  code=$?
  echo "run $i at $rev rc=$code seconds=$(( $(date +%s) - started )) $(grep -E 'passed|failed' "$OUT/run$i.log" | tail -1)" >> "$OUT/summary.txt"
  deactivate; cd "$WORK" && rm -rf "$dir"
done
rm -rf "$WORK"
