#!/usr/bin/env bash
# make demo: the two-node lab, live replication of a mixed workload, status
# and a clean verify, a failover of a service behind the VIP, the old
# primary's return, a swap back, then teardown. Needs root (make demo).
set -euo pipefail
cd "$(dirname "$0")/.."
export DUET_LAB=${DUET_LAB:-/var/tmp/duet-demo}
export DUET_BIN=${DUET_BIN:-$PWD/bin/duet}
lab=tools/lab/lab.sh
say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
trap '$lab down >/dev/null 2>&1 || true' EXIT

say "1. Two hosts as network namespaces, each with its own ext4 on a loop device"
$lab up
go build -o bin/hello ./tools/hello
for h in a b; do
	name=$([ $h = a ] && echo nodeA || echo nodeB)
	cat >>"$DUET_LAB/$h.yaml" <<EOF
services:
  - name: hello
    start: $PWD/bin/hello serve -listen 0.0.0.0:8080 -name $name
    check_tcp: 127.0.0.1:8080
EOF
done
say "2. duet on nodeB, then nodeA (the configured primary: VIP 10.250.0.100, service hello, eBPF capture)"
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
say "8. The client reaches the service through the VIP"
$lab exec c bin/hello connect -addr 10.250.0.100:8080
say "9. nodeA's host dies (every process killed, link down): nodeB takes over"
t0=$(date +%s%N)
$lab crash a
$lab exec c bin/hello connect -addr 10.250.0.100:8080 -since "$t0" | sed 's/^\([0-9]*\) /ms from the crash to the first answer: \1, answer: /'
$lab duet b status | head -4
say "10. nodeA comes back: resynchronised from nodeB, it becomes SECOND"
$lab revive a
$lab start a
for _ in $(seq 300); do $lab duet a status | grep -q 'state SECOND' && break; sleep 0.2; done
$lab duet a status | head -3
echo "what nodeB sent to bring nodeA level (only what changed since nodeA's sync point):"
$lab duet b status | grep -E 'last resync|modification bitmap' || true
say "11. duet swap on nodeB: the service moves back to nodeA, nothing lost"
$lab duet b status --wait-sync 120s >/dev/null
$lab duet b swap
$lab exec c bin/hello connect -addr 10.250.0.100:8080
$lab duet a status --wait-sync 120s >/dev/null
$lab duet a verify
say "Demo done: the lab is removed on exit"
