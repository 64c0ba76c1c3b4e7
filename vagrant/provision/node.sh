#!/usr/bin/env bash
# Provisions a K3S server node with duet: MariaDB installed but left to
# duet (it runs on the primary only, with duet's own NFS server), duet
# configured with the k3s module, K3S with its datastore on the VIP.
# Environment: THIS (node name), NODES (name=ip,name=ip), VIP, NET,
# DUET_K3S_VERSION.
set -euo pipefail
# shellcheck source=vagrant/provision/common.sh
. /tmp/duet-provision/common.sh

apt-get update -qq
apt-get install -y -qq mariadb-server mariadb-client nfs-common curl >/dev/null
# duet starts MariaDB on the primary; the package's own unit must not.
systemctl disable --now mariadb 2>/dev/null || true

install -m 0755 /tmp/duet /usr/bin/duet
install -m 0644 /tmp/duet-provision/duet.service /etc/systemd/system/duet.service

self_ip=${NODES#*"$THIS"=}
self_ip=${self_ip%%,*}
iface=$(iface_of "$self_ip")
[ -n "$iface" ] || { echo "no interface carries $self_ip" >&2; exit 1; }

mkdir -p /etc/duet
lab_secret duet-key >/etc/duet/key
lab_secret db-password >/etc/duet/k3s-db.password
chmod 600 /etc/duet/key /etc/duet/k3s-db.password
duet init k3s --force --this "$THIS" --nodes "$NODES" --vip "$VIP/24" --interface "$iface" \
	--witness "$NET.1" --prefer nodeA
# K3S names its nodes in lower case (Kubernetes requires it): the
# peer_lost hook must taint the peer's K3S name, not its duet name.
peer=$(tr ',' '\n' <<<"$NODES" | cut -d= -f1 | grep -vx "$THIS")
peer_kube=$(tr '[:upper:]' '[:lower:]' <<<"$peer")
sed -i "s/^  # peer_kube_node: .*/  peer_kube_node: $peer_kube/" /etc/duet/duet.yaml
grep -q "^  peer_kube_node: $peer_kube\$" /etc/duet/duet.yaml ||
	{ echo "provision: could not set k3s.peer_kube_node in /etc/duet/duet.yaml" >&2; exit 1; }
# The mysql user owns MariaDB's replicated data directory.
chown mysql:mysql /var/lib/duet-k3s/mysql
systemctl daemon-reload
systemctl enable --now duet

# K3S: a server on both nodes, its datastore MariaDB on the VIP (through
# the kine that K3S embeds). The datastore URL holds the password: it goes
# to the unit's environment file, not to its command line. nodeA's duet
# serves alone at first; nodeB's K3S needs nodeA's datastore.
pw=$(cat /etc/duet/k3s-db.password)
wait_for 600 "MariaDB on $VIP:3306 (does duet serve? vagrant ssh nodeA -c 'sudo duet status')" tcp_open "$VIP" 3306
K3S_DATASTORE_ENDPOINT="mysql://kine:$pw@tcp($VIP:3306)/kine" install_k3s k3s server --node-name "$THIS" \
	--node-ip "$self_ip" --flannel-iface "$iface" --tls-san "$VIP" --write-kubeconfig-mode 0644
wait_for 600 "the K3S API on $THIS (journalctl -u k3s)" k3s kubectl get nodes

# The NFS provisioner's storage class (the first server to get here
# applies it; applying twice is harmless).
sed "s/@VIP@/$VIP/" /tmp/duet-provision/nfs-provisioner.yaml | k3s kubectl apply -f -
duet status
