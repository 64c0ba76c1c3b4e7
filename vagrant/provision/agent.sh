#!/usr/bin/env bash
# Provisions an extra K3S agent: it joins through the VIP and mounts
# volumes from the NFS server on the VIP. No duet here.
set -euo pipefail
# shellcheck source=vagrant/provision/common.sh
. /tmp/duet-provision/common.sh
apt-get update -qq
apt-get install -y -qq nfs-common curl >/dev/null
self_ip=$(ip -o -4 addr show | awk -v n="$NET." '$4 ~ "^"n {sub("/.*", "", $4); print $4; exit}')
iface=$(iface_of "$self_ip")
[ -n "$iface" ] || { echo "provision: no interface carries $self_ip" >&2; exit 1; }
# flannel would take the default route's interface: on VirtualBox eth0,
# 10.0.2.15 on every VM.
wait_for 600 "the K3S API on $VIP:6443 (are nodeA and nodeB up?)" tcp_open "$VIP" 6443
K3S_URL="https://$VIP:6443" install_k3s k3s-agent agent --node-name nodeC --node-ip "$self_ip" --flannel-iface "$iface"
wait_for 600 "the K3S agent (journalctl -u k3s-agent)" systemctl is-active k3s-agent
