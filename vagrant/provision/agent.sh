#!/usr/bin/env bash
# Provisions an extra K3S agent: it joins through the VIP and mounts
# volumes from the NFS server on the VIP. No duet here.
set -euo pipefail
# shellcheck source=vagrant/provision/common.sh
. /tmp/duet-provision/common.sh
apt-get update -qq
apt-get install -y -qq nfs-common curl >/dev/null
self_ip=$(ip -o -4 addr show | awk -v n="$NET." '$4 ~ "^"n {sub("/.*", "", $4); print $4; exit}')
K3S_URL="https://$VIP:6443" install_k3s agent --node-name nodeC --node-ip "$self_ip"
