#!/usr/bin/env bash
# The duet lab: two hosts (nodeA, nodeB) and a client as network namespaces
# on a bridge (itself in a namespace, so the host's own network is never
# touched), each host with its own ext4 filesystem on a loop device.
#
#   lab.sh up                 create (or re-create) the lab
#   lab.sh down               remove everything, also after a failed run
#   lab.sh start a|b [args]   start duet on a host (extra args go to duet run)
#   lab.sh stop a|b           SIGTERM the host's duet and wait for it
#   lab.sh kill a|b           SIGKILL the host's duet
#   lab.sh crash a|b          SIGKILL everything on the host and take its link down
#   lab.sh powercut a|b...    cut the hosts' power: links down, then each filesystem
#                             stops where its disk is (what was not written back is
#                             lost), everything killed, filesystems mounted again
#                             (journal replay) and a new boot id; then revive and start
#   lab.sh diskfail a|b       the host's disk fails: its filesystem turns read-only
#                             (ext4) or shuts down (XFS: EIO), its link and processes
#                             stay up; a powercut then stands for the repair
#   lab.sh stall a|b          the host stalls (a paused VM): its link down, every
#                             process on it stopped (SIGSTOP); its state is kept
#   lab.sh resume a|b         the stalled host goes on: link up, processes continued
#   lab.sh revive a|b         bring a crashed host's link back (as after a reboot:
#                             without the VIP); then start duet on it again
#   lab.sh exec a|b|c CMD...  run a command inside a host's namespace
#   lab.sh duet a|b ARGS...   run the duet CLI on a host with its config
#   lab.sh env                print the lab's paths as shell variables
#
# Environment: DUET_LAB (state directory, default /var/tmp/duet-lab),
# DUET_BIN (the duet binary, default bin/duet), DUET_LAB_FS (ext4, xfs or btrfs),
# DUET_LAB_FS_B (nodeB's filesystem when it differs from nodeA's: a replica
# on another filesystem than its source),
# DUET_LAB_SIZE (image size, default 4G), DUET_RING_KIB (capture ring).
set -euo pipefail

LAB=${DUET_LAB:-/var/tmp/duet-lab}
BIN=${DUET_BIN:-$(cd "$(dirname "$0")/../.." && pwd)/bin/duet}
FS=${DUET_LAB_FS:-ext4}
declare -A FSOF=([a]=$FS [b]=${DUET_LAB_FS_B:-$FS})
SIZE=${DUET_LAB_SIZE:-4G}
NET=10.250.0
declare -A ADDR=([a]=$NET.1 [b]=$NET.2 [c]=$NET.10)
declare -A NODE=([a]=nodeA [b]=nodeB)
PORT=7788
VIP=$NET.100

die() { echo "lab: $*" >&2; exit 1; }
ns() { echo "duet-$1"; }

need() {
	local fs
	for fs in "${FSOF[a]}" "${FSOF[b]}"; do
		case $fs in ext4 | xfs | btrfs) ;; *) die "DUET_LAB_FS=$FS DUET_LAB_FS_B=${FSOF[b]}: each ext4, xfs or btrfs" ;; esac
		command -v "mkfs.$fs" >/dev/null || die "mkfs.$fs not found: install the $fs tools"
	done
	for t in ip losetup mount; do
		command -v "$t" >/dev/null || die "$t not found: install iproute2 and util-linux"
	done
}

down() {
	for h in a b; do
		if [ -f "$LAB/$h.pid" ]; then
			kill -9 "$(cat "$LAB/$h.pid")" 2>/dev/null || true
			rm -f "$LAB/$h.pid"
		fi
	done
	for n in a b c sw; do
		if ip netns list | grep -qw "$(ns $n)"; then
			# Anything still running in the namespace goes with it.
			for p in $(ip netns pids "$(ns $n)" 2>/dev/null); do kill -9 "$p" 2>/dev/null || true; done
			ip netns del "$(ns $n)"
		fi
	done
	for h in a b; do
		# Not mountpoint(1): it stats the directory, which a failed
		# filesystem (diskfail) answers with EIO, and the lab stayed.
		if grep -qs " $LAB/$h " /proc/mounts; then
			umount "$LAB/$h" 2>/dev/null || umount -l "$LAB/$h"
		fi
		if [ -f "$LAB/$h.loop" ]; then
			losetup -d "$(cat "$LAB/$h.loop")" 2>/dev/null || true
		fi
	done
	# Loop devices left behind by an earlier, interrupted lab.
	rm -f "$LAB"/*.img.cut # a power cut's copy, if it stopped midway
	rm -f "$LAB"/*.diskfailed
	for img in "$LAB/a.img" "$LAB/b.img"; do
		for d in $(losetup -j "$img" -O NAME -n 2>/dev/null); do losetup -d "$d" 2>/dev/null || true; done
	done
	rm -rf "$LAB"
}

config() { # host
	local h=$1 other
	[ "$h" = a ] && other=b || other=a
	cat >"$LAB/$h.yaml" <<EOF
# duet lab: ${NODE[$h]}
node: ${NODE[$h]}
role: $([ "$h" = a ] && echo primary || echo secondary)
listen: ${ADDR[$h]}:$PORT
peer: ${ADDR[$other]}:$PORT
key_file: $LAB/key
state_dir: $LAB/$h/.duet
ring_buffer_kib: ${DUET_RING_KIB:-16384}
replicate:
  - name: data
    path: $LAB/$h/data
cluster:
  witness: ${ADDR[c]}           # the client namespace stands for the gateway
vip:
  address: $VIP/24
  interface: eth0
metrics: 127.0.0.1:9788
EOF
}

up() {
	need
	down
	mkdir -p "$LAB"
	rm -f "$LAB"/*.boot_id
	for h in a b; do
		truncate -s "$SIZE" "$LAB/$h.img"
		# Forced: the image of an earlier run keeps its signature.
		if [ "${FSOF[$h]}" = ext4 ]; then mkfs.ext4 -q -F "$LAB/$h.img"; else "mkfs.${FSOF[$h]}" -q -f "$LAB/$h.img"; fi
		losetup --find --show "$LAB/$h.img" >"$LAB/$h.loop"
		mkdir -p "$LAB/$h"
		mount "$(cat "$LAB/$h.loop")" "$LAB/$h"
		mkdir -p "$LAB/$h/data" "$LAB/$h/.duet"
	done
	ip netns add "$(ns sw)"
	ip -n "$(ns sw)" link add br0 type bridge
	ip -n "$(ns sw)" link set br0 up
	for n in a b c; do
		ip netns add "$(ns $n)"
		ip link add "veth-$n" type veth peer name eth0 netns "$(ns $n)"
		ip link set "veth-$n" netns "$(ns sw)"
		ip -n "$(ns sw)" link set "veth-$n" master br0 up
		ip -n "$(ns $n)" addr add "${ADDR[$n]}/24" dev eth0
		ip -n "$(ns $n)" link set eth0 up
		ip -n "$(ns $n)" link set lo up
	done
	head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$LAB/key"
	chmod 600 "$LAB/key"
	config a
	config b
	echo "lab up: nodeA ${ADDR[a]} ($LAB/a/data), nodeB ${ADDR[b]} ($LAB/b/data), client ${ADDR[c]}"
}

host() {
	case "${1:-}" in a | b) ;; *) die "host must be a or b, got '${1:-}'" ;; esac
	[ -f "$LAB/$1.yaml" ] || die "no lab: run '$0 up' first"
}

start() {
	local h=$1
	shift
	host "$h"
	[ -x "$BIN" ] || die "duet binary $BIN missing: run 'make build' or set DUET_BIN"
	if [ -f "$LAB/$h.pid" ] && kill -0 "$(cat "$LAB/$h.pid")" 2>/dev/null; then
		die "duet already running on ${NODE[$h]}"
	fi
	# DUET_LAB_LOG_LEVEL=debug logs every captured record and every op
	# shipped and applied (for a divergence to be traced).
	if [ -f "$LAB/$h.boot_id" ]; then
		# After a power cut: the host booted again. ip netns exec gives
		# the command a mount namespace of its own, where the bind stays.
		# shellcheck disable=SC2016 # expanded by the inner shell
		ip netns exec "$(ns "$h")" sh -c 'mount --bind "$0" /proc/sys/kernel/random/boot_id && exec "$@"' "$LAB/$h.boot_id" \
			"$BIN" run --config "$LAB/$h.yaml" --log-level "${DUET_LAB_LOG_LEVEL:-info}" "$@" >>"$LAB/$h.log" 2>&1 &
	else
		ip netns exec "$(ns "$h")" "$BIN" run --config "$LAB/$h.yaml" --log-level "${DUET_LAB_LOG_LEVEL:-info}" "$@" >>"$LAB/$h.log" 2>&1 &
	fi
	echo $! >"$LAB/$h.pid"
	# Ready when the control socket answers.
	for _ in $(seq 100); do
		if "$BIN" status --config "$LAB/$h.yaml" >/dev/null 2>&1; then return 0; fi
		kill -0 "$(cat "$LAB/$h.pid")" 2>/dev/null || { tail -20 "$LAB/$h.log" >&2; die "duet on ${NODE[$h]} exited"; }
		sleep 0.1
	done
	tail -20 "$LAB/$h.log" >&2
	die "duet on ${NODE[$h]} did not come up"
}

# gone PID HOST: wait until a SIGKILLed duet is gone for good, its sockets
# released, before anything restarts it. That takes seconds: the kernel
# detaches its BPF links one by one as it closes them (2.6-2.9 s for the
# ~85 links here), and the peer port stays bound until then.
gone() {
	local state
	for _ in $(seq 3000); do
		kill -0 "$1" 2>/dev/null || return 0
		# A zombie not reaped yet has closed its files (and sockets) once
		# it is its group's last thread: a leader that exits first is a
		# zombie while its other threads still close the shared files.
		# Gone between the two looks: sed fails, and under pipefail and
		# set -e the assignment ended the script with sed's status 2, no
		# message (CI: "killing duet on a: exit status 2").
		state=$(sed 's/.*) //' "/proc/$1/stat" 2>/dev/null | cut -d' ' -f1) || return 0
		if [ "$state" = Z ] && [ "$(find "/proc/$1/task" -mindepth 1 -maxdepth 1 2>/dev/null | wc -l)" -le 1 ]; then
			return 0
		fi
		sleep 0.01
	done
	die "duet on ${NODE[$2]} (pid $1) still exists 30 s after SIGKILL"
}

stop() {
	host "$1"
	[ -f "$LAB/$1.pid" ] || return 0
	local pid
	pid=$(cat "$LAB/$1.pid")
	kill "$pid" 2>/dev/null || true
	for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
	kill -9 "$pid" 2>/dev/null || true
	gone "$pid" "$1"
	rm -f "$LAB/$1.pid"
}

case "${1:-}" in
up) up ;;
down) down ;;
start) shift; start "$@" ;;
stop) stop "${2:-}" ;;
kill)
	host "${2:-}"
	if [ -f "$LAB/$2.pid" ]; then
		pid=$(cat "$LAB/$2.pid")
		kill -9 "$pid" 2>/dev/null || true
		gone "$pid" "$2"
		rm -f "$LAB/$2.pid"
	fi
	;;
crash)
	host "${2:-}"
	ip -n "$(ns "$2")" link set eth0 down
	for p in $(ip netns pids "$(ns "$2")"); do kill -9 "$p" 2>/dev/null || true; done
	if [ -f "$LAB/$2.pid" ]; then
		gone "$(cat "$LAB/$2.pid")" "$2"
		rm -f "$LAB/$2.pid"
	fi
	;;
powercut)
	shift
	[ $# -gt 0 ] || die "usage: $0 powercut a|b..."
	for h in "$@"; do host "$h"; done
	# All at once, as one power feed: no host hears another after this.
	for h in "$@"; do ip -n "$(ns "$h")" link set eth0 down; done
	# FS_IOC_SHUTDOWN without a log flush (xfstests' way to simulate a
	# power failure): the filesystem does no more I/O, and the dirty page
	# cache it held is dropped, so only what reached the loop device
	# survives. btrfs has no such ioctl on kernels up to 6.18 at least.
	for h in "$@"; do
		if [ -f "$LAB/$h.diskfailed" ]; then
			rm -f "$LAB/$h.diskfailed" # down already: diskfail
			continue
		fi
		xfs_io -x -c shutdown "$LAB/$h" || die "cannot shut ${NODE[$h]}'s ${FSOF[$h]} filesystem down (FS_IOC_SHUTDOWN): no power cut on it"
	done
	# The disk as it is at the cut. The shut-down filesystem's block
	# device still writes back the metadata buffers it had dirtied, and
	# the mount namespaces of the processes started under ip netns exec on
	# the other host keep it alive (the host's mounts are private: the
	# unmount does not reach them): on the image itself those writes
	# landed under the new mount and corrupted it (e2fsck: a directory of
	# 3000 files cut out of /; from a review). The node comes back on this
	# copy; the old device writes into the old file, unlinked below.
	for h in "$@"; do
		cp --sparse=always "$LAB/$h.img" "$LAB/$h.img.cut"
	done
	for h in "$@"; do
		for p in $(ip netns pids "$(ns "$h")"); do kill -9 "$p" 2>/dev/null || true; done
		if [ -f "$LAB/$h.pid" ]; then
			gone "$(cat "$LAB/$h.pid")" "$h"
			rm -f "$LAB/$h.pid"
		fi
	done
	for h in "$@"; do
		# The killed processes close their files as they go.
		for i in $(seq 200); do
			umount "$LAB/$h" 2>/dev/null && break
			[ "$i" -lt 200 ] || die "cannot unmount ${NODE[$h]}'s filesystem after the power cut: $(fuser -vm "$LAB/$h" 2>&1 | tail -3)"
			sleep 0.05
		done
		# On a new loop device, on the copy: mounting the same device
		# again would return the shut-down filesystem the other mount
		# namespaces keep alive, every read failing with EIO. The old
		# device goes once they do.
		losetup -d "$(cat "$LAB/$h.loop")" 2>/dev/null || true
		mv "$LAB/$h.img.cut" "$LAB/$h.img"
		losetup --find --show "$LAB/$h.img" >"$LAB/$h.loop"
		# XFS refuses a second mount of one filesystem UUID, and the
		# shut-down one lives on in the other host's mount namespaces.
		if [ "${FSOF[$h]}" = xfs ]; then
			mount -o nouuid "$(cat "$LAB/$h.loop")" "$LAB/$h"
		else
			mount "$(cat "$LAB/$h.loop")" "$LAB/$h"
		fi
		find "$LAB/$h/.duet" -maxdepth 1 -type f -exec cat {} + >/dev/null ||
			die "${NODE[$h]}'s filesystem fails reads after the power cut"
		cat /proc/sys/kernel/random/uuid >"$LAB/$h.boot_id"
	done
	;;
diskfail)
	# The disk fails under the running host, its link and its processes
	# staying up. ext4 as Debian mounts its root (errors=remount-ro): a
	# failed write aborts the journal and the filesystem turns read-only
	# (trigger_fs_error stands for the failed write); XFS shuts itself
	# down, every later I/O failing with EIO (FS_IOC_SHUTDOWN without a
	# log flush). A powercut of the host then stands for its repair: it
	# comes back on its disk as it was.
	host "${2:-}"
	if [ "${FSOF[$2]}" = ext4 ]; then
		mount -o remount,errors=remount-ro "$LAB/$2" || die "cannot remount ${NODE[$2]}'s filesystem with errors=remount-ro"
		echo diskfail >"/sys/fs/ext4/$(basename "$(cat "$LAB/$2.loop")")/trigger_fs_error" ||
			die "cannot raise an error on ${NODE[$2]}'s ext4 filesystem (trigger_fs_error)"
	else
		xfs_io -x -c shutdown "$LAB/$2" || die "cannot shut ${NODE[$2]}'s ${FSOF[$2]} filesystem down (FS_IOC_SHUTDOWN): no disk failure on it"
	fi
	touch "$LAB/$2.diskfailed"
	;;
stall)
	host "${2:-}"
	ip -n "$(ns "$2")" link set eth0 down
	for p in $(ip netns pids "$(ns "$2")"); do kill -STOP "$p" 2>/dev/null || true; done
	;;
resume)
	host "${2:-}"
	ip -n "$(ns "$2")" link set eth0 up
	for p in $(ip netns pids "$(ns "$2")"); do kill -CONT "$p" 2>/dev/null || true; done
	;;
revive)
	host "${2:-}"
	ip -n "$(ns "$2")" addr del "$VIP/24" dev eth0 2>/dev/null || true
	ip -n "$(ns "$2")" link set eth0 up
	;;
exec)
	n=${2:-}; shift 2 || die "usage: $0 exec a|b|c CMD..."
	exec ip netns exec "$(ns "$n")" "$@"
	;;
duet)
	h=${2:-}; host "$h"; cmd=${3:-}; shift 3 || die "usage: $0 duet a|b COMMAND [ARGS...]"
	exec ip netns exec "$(ns "$h")" "$BIN" "$cmd" --config "$LAB/$h.yaml" "$@"
	;;
env)
	echo "LAB=$LAB"; echo "A_DATA=$LAB/a/data"; echo "B_DATA=$LAB/b/data"; echo "BIN=$BIN"
	;;
*)
	sed -n '2,27p' "$0" | sed 's/^# \{0,1\}//'
	exit 2
	;;
esac
