#!/usr/bin/env bash
# Failover test on the Vagrant lab (run from this directory after
# `vagrant up`): deploys a pod that appends an fsynced counter to an NFS
# volume, powers off the VM that serves duet's stack (the primary), and
# checks that the pod runs again on the survivor and that every counter
# value it acknowledged is in the file. Then the VM is started again and
# duet fails back to it (cluster.prefer: nodeA).
#
#   ./failover-test.sh            # exit 0: no acknowledged write lost
set -euo pipefail
cd "$(dirname "$0")"

log() { printf '%s %s\n' "$(date +%T)" "$*"; }
die() { log "FAIL: $*"; exit 1; }
on() { # node, command...
	local n=$1
	shift
	vagrant ssh "$n" -c "$*" -- -q 2>/dev/null | tr -d '\r'
}
kc() { # node, kubectl args...
	local n=$1
	shift
	on "$n" "sudo k3s kubectl $*"
}
primary() {
	for n in nodeA nodeB; do
		if on "$n" "sudo duet status" | grep -Eq '^node [^ ]+ +state (PRIM|ALONE)'; then
			echo "$n"
			return 0
		fi
	done
	return 1
}

p=$(primary) || die "no node serves: is the lab up (vagrant up) and duet running?"
[ "$p" = nodeA ] && s=nodeB || s=nodeA
log "duet primary: $p, survivor-to-be: $s"

kc "$s" delete deployment counter --ignore-not-found --wait=true >/dev/null
kc "$s" delete pvc counter --ignore-not-found --wait=true >/dev/null
on "$s" "cat > /tmp/counter.yaml" <counter.yaml
kc "$s" apply -f /tmp/counter.yaml >/dev/null
kc "$s" rollout status deployment/counter --timeout=300s >/dev/null || die "the counter pod did not start"
pod_node=$(kc "$s" get pods -l app=counter -o "jsonpath='{.items[0].spec.nodeName}'")
log "counter pod runs on $pod_node"

# Acknowledgements are streamed to a local file until the kill.
acks=$(mktemp)
trap 'rm -f "$acks"; kill "$stream" 2>/dev/null || true' EXIT
on "$s" "sudo k3s kubectl logs -f deployment/counter" >"$acks" &
stream=$!
sleep 20
last=$(grep -c '^acked' "$acks" || true)
[ "$last" -gt 0 ] || die "the pod acknowledged no write in 20 s"

log "powering off $p (acknowledged so far: $last)"
t0=$(date +%s)
vagrant halt --force "$p" >/dev/null
sleep 2
kill "$stream" 2>/dev/null || true
acked=$(awk '/^acked/ {n=$2} END {print n+0}' "$acks")
log "last acknowledged before the power-off: $acked"

# The survivor serves the stack, the pod runs there and writes again.
for _ in $(seq 120); do
	if on "$s" "sudo duet status" | grep -Eq '^node [^ ]+ +state ALONE'; then break; fi
	sleep 1
done
log "duet on $s: $(on "$s" "sudo duet status" | head -1)"
running=""
for _ in $(seq 120); do
	running=$(kc "$s" get pods -l app=counter --field-selector status.phase=Running -o "jsonpath='{.items[*].spec.nodeName}'")
	if [ "$running" = "$s" ]; then
		before=$(kc "$s" exec deploy/counter -- tail -n 1 /data/counter || echo 0)
		sleep 3
		after=$(kc "$s" exec deploy/counter -- tail -n 1 /data/counter || echo 0)
		[ "${after:-0}" -gt "${before:-0}" ] && break
	fi
	sleep 2
done
[ "$running" = "$s" ] || die "the counter pod is not running on $s $(($(date +%s) - t0)) s after the power-off"
log "counter pod writing again on $s, $(($(date +%s) - t0)) s after the power-off"
log "taints of $p: $(kc "$s" get node "$p" -o "jsonpath='{.spec.taints[*].key}'")"

# Every acknowledged value must be in the file.
missing=$(kc "$s" exec deploy/counter -- sh -c "'sort -n -u /data/counter'" |
	awk -v last="$acked" '{seen[$1]=1} END {m=0; for (i=1; i<=last; i++) if (!(i in seen)) m++; print m}')
log "acknowledged: $acked, lost: $missing"
[ "$missing" = 0 ] || die "$missing acknowledged counter values are missing"

log "starting $p again: duet resyncs it and fails back (prefer: nodeA)"
vagrant up "$p" >/dev/null
for _ in $(seq 180); do
	if on "$s" "sudo duet status" | grep -q 'in sync: yes'; then break; fi
	sleep 2
done
on "$s" "sudo duet status" | head -3
log "PASS: 0 of $acked acknowledged writes lost"
