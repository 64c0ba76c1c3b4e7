#!/usr/bin/env bash
# make demo: the two-node lab, live replication of a mixed workload, status
# and a clean verify, a failover of a service behind the VIP, the old
# primary's return, a swap back, then the K3S module (MariaDB, duet's NFS
# server, kine behind the VIP, a crash of its host) when installed, then
# teardown.
# Needs root (make demo).
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
$lab duet a status --wait-sync 120s | grep -E '^dir '
echo "nodeA's log when nodeB's daemon came back (resume=true: the session goes on after the last batch nodeB applied, no resync):"
grep 'replication connected' "$DUET_LAB/a.log" | tail -1 | grep -o 'resume=[a-z]* peer_applied=[0-9]*'
$lab duet a verify
say "8. The client reaches the service through the VIP"
$lab exec c bin/hello connect -addr 10.250.0.100:8080 | sed 's/^\([0-9]*\) /answered in \1 ms: /'
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
$lab exec c bin/hello connect -addr 10.250.0.100:8080 | sed 's/^\([0-9]*\) /answered in \1 ms: /'
$lab duet a status --wait-sync 120s >/dev/null
$lab duet a verify
# The K3S module: MariaDB (K3S's datastore), the NFS server for volumes and
# kine (the etcd API K3S uses) behind the VIP, with real clients.
kine=$(command -v kine || true)
[ -n "$kine" ] || kine=$(ls "$(go env GOPATH)/bin/kine" 2>/dev/null || true)
missing=""
for t in mariadbd etcdctl nfs-cp mariadb; do command -v $t >/dev/null || missing="$missing $t"; done
[ -n "$kine" ] || missing="$missing kine"
if [ -n "$missing" ]; then
	say "12. The K3S module: skipped, not installed:$missing (apt-get install mariadb-server libnfs-utils etcd-client; go install github.com/k3s-io/kine@v0.17.5)"
	say "Demo done: the lab is removed on exit"
	exit 0
fi
say "12. The K3S module: duet restarted on both nodes with module: k3s (MariaDB, duet's NFS server, kine on the primary)"
$lab stop b
$lab stop a
pw="demo-Password-0123456789"
echo "$pw" >"$DUET_LAB/k3s.password"
chmod 600 "$DUET_LAB/k3s.password"
cat >"$DUET_LAB/kubectl" <<EOF
#!/bin/sh
echo "  \$DUET_NODE ran: kubectl \$*" >>"$DUET_LAB/kubectl.log"
EOF
chmod +x "$DUET_LAB/kubectl"
# peer_lost (the taint) runs only for a peer confirmed down: fenced, or
# silent for a minute. A site fences with a command that powers the peer
# off (IPMI, a smart PDU); the lab's crash has already done that, so the
# stand-in only logs.
cat >"$DUET_LAB/fence" <<EOF
#!/bin/sh
echo "  fenced the peer (a stand-in: the lab's crash took the host down)" >>"$DUET_LAB/kubectl.log"
EOF
chmod +x "$DUET_LAB/fence"
for h in a b; do
	mkdir -p "$DUET_LAB/$h/k3s/mysql" "$DUET_LAB/$h/k3s/nfs"
	sed -i '/^services:/,$d' "$DUET_LAB/$h.yaml"
	sed -i "s|^cluster:\$|cluster:\n  fence: $DUET_LAB/fence|" "$DUET_LAB/$h.yaml"
	cat >>"$DUET_LAB/$h.yaml" <<EOF
module: k3s
k3s:
  data_dir: $DUET_LAB/$h/k3s
  password_file: $DUET_LAB/k3s.password
  mysql_user: root
  kine: 0.0.0.0:2379
  kine_bin: $kine
  kubectl: $DUET_LAB/kubectl
EOF
done
$lab start a
$lab start b
for _ in $(seq 300); do [ "$($lab duet a status | grep -c ', healthy,')" = 3 ] && break; sleep 0.2; done
$lab duet a status --wait-sync 120s | grep -E '^(node|vip|module|service)'
say "13. Clients through the VIP: an etcd key (kine), a committed row (MariaDB), a file over NFSv3"
vip=10.250.0.100
$lab exec c env ETCDCTL_API=3 etcdctl --endpoints "http://$vip:2379" put /demo/key "written on nodeA"
$lab exec c env MYSQL_PWD="$pw" mariadb --no-defaults -h $vip -u kine kine -e \
	"CREATE TABLE demo (id INT PRIMARY KEY, v VARCHAR(40)); INSERT INTO demo VALUES (1, 'committed on nodeA');"
echo "a file written over NFS" >"$DUET_LAB/nfs-src"
# duet's NFS server: NFSv3, NFS and MOUNT on port 2049, no portmapper; it
# syncs every WRITE before the reply, so the peer has the file once
# nfs-cp returns.
nfsurl="version=3&nfsport=2049&mountport=2049&auto-traverse-mounts=0"
$lab exec c nfs-cp "$DUET_LAB/nfs-src" "nfs://$vip//demo.txt?$nfsurl"
say "14. nodeA's host dies: nodeB takes the VIP and starts the stack; the data is there"
t0=$(date +%s%N)
$lab crash a
until $lab exec c env ETCDCTL_API=3 etcdctl --endpoints "http://$vip:2379" --dial-timeout 1s get /demo/key 2>/dev/null | grep -q nodeA; do
	sleep 0.1
	[ $(($(date +%s%N) - t0)) -lt 60000000000 ] || { echo "the stack did not come back on nodeB"; exit 1; }
done
echo "served again by nodeB $(( ($(date +%s%N) - t0) / 1000000 )) ms after the crash:"
$lab exec c env ETCDCTL_API=3 etcdctl --endpoints "http://$vip:2379" get /demo/key
$lab exec c env MYSQL_PWD="$pw" mariadb --no-defaults -h $vip -u kine kine -N -e "SELECT * FROM demo"
$lab exec c nfs-cat "nfs://$vip//demo.txt?$nfsurl"
sleep 1
$lab duet b status | grep -E '^(node|vip|service|hook)'
echo "the fencing command and the peer_lost hook (logging stand-ins for a power switch and kubectl: k3s cannot be installed here):"
for _ in $(seq 50); do grep -q kubectl "$DUET_LAB/kubectl.log" 2>/dev/null && break; sleep 0.1; done
cat "$DUET_LAB/kubectl.log"
echo "(with K3S, this taints nodeA out of service so that its pods restart on nodeB at once)"
say "Demo done: the lab is removed on exit"
