#!/usr/bin/env bash
# make demo: the two-node lab, live replication of a mixed workload, status
# and a clean verify, then teardown. Needs root (run through make demo).
set -euo pipefail
cd "$(dirname "$0")/.."
export DUET_LAB=${DUET_LAB:-/var/tmp/duet-demo}
export DUET_BIN=${DUET_BIN:-$PWD/bin/duet}
lab=tools/lab/lab.sh
say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
trap '$lab down >/dev/null 2>&1 || true' EXIT

say "1. Two hosts as network namespaces, each with its own ext4 on a loop device"
$lab up
say "2. duet on nodeB (secondary), then nodeA (primary, eBPF capture)"
$lab start b
$lab start a
go build -o bin/workload ./tools/workload
say "3. A mixed workload on nodeA: writes, mmap, O_DIRECT, truncates, holes, renames, links, odd names"
bin/workload -dir "$DUET_LAB/a/data" -seed "${SEED:-$RANDOM}" -ops "${OPS:-2000}"
say "4. duet status on nodeA, once everything is on nodeB"
$lab duet a status --wait-sync 120s
say "5. duet status on nodeB"
$lab duet b status
say "6. duet verify: both copies compared by checksum"
$lab duet a verify
say "7. Kill nodeB's daemon, keep writing, restart it: duet resumes"
$lab kill b
bin/workload -dir "$DUET_LAB/a/data" -seed 7 -ops 300 >/dev/null
$lab start b
$lab duet a status --wait-sync 120s | tail -3
$lab duet a verify
say "Demo done: the lab is removed on exit"
