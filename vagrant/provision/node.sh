#!/usr/bin/env bash
# Provisions a K3S server node with duet: MariaDB and nfs-ganesha installed
# but left to duet (they run on the primary only), duet configured with the
# k3s module, K3S with its datastore on the VIP.
# Environment: THIS (node name), NODES (name=ip,name=ip), VIP, NET.
set -euo pipefail
# shellcheck source=vagrant/provision/common.sh
. /tmp/duet-provision/common.sh

apt-get update -qq
apt-get install -y -qq mariadb-server mariadb-client nfs-ganesha nfs-ganesha-vfs nfs-common curl >/dev/null
# duet starts them on the primary; the packages' own units must not.
systemctl disable --now mariadb nfs-ganesha 2>/dev/null || true

install -m 0755 /tmp/duet /usr/local/bin/duet
install -m 0644 /tmp/duet-provision/duet.service /etc/systemd/system/duet.service

self_ip=${NODES#*"$THIS"=}
self_ip=${self_ip%%,*}
iface=$(iface_of "$self_ip")
[ -n "$iface" ] || { echo "no interface carries $self_ip" >&2; exit 1; }

mkdir -p /etc/duet
lab_secret duet-key >/etc/duet/key
lab_secret db-password >/etc/duet/k3s-db.password
chmod 600 /etc/duet/key /etc/duet/k3s-db.password
# The mysql user owns MariaDB's replicated data directory.
duet init k3s --force --this "$THIS" --nodes "$NODES" --vip "$VIP/24" --interface "$iface" \
	--witness "$NET.1" --prefer nodeA
chown mysql:mysql /var/lib/duet-k3s/mysql
systemctl daemon-reload
systemctl enable --now duet

# K3S: a server on both nodes, its datastore MariaDB on the VIP (through
# the kine that K3S embeds). It retries until duet serves the database.
pw=$(cat /etc/duet/k3s-db.password)
install_k3s server --node-name "$THIS" --node-ip "$self_ip" --flannel-iface "$iface" \
	--datastore-endpoint "mysql://kine:$pw@tcp($VIP:3306)/kine" --tls-san "$VIP" \
	--write-kubeconfig-mode 0644

# The NFS provisioner's storage class, once the API answers (the first
# server to get here applies it; applying twice is harmless).
for _ in $(seq 60); do k3s kubectl get nodes >/dev/null 2>&1 && break; sleep 5; done
sed "s/@VIP@/$VIP/" /tmp/duet-provision/nfs-provisioner.yaml | k3s kubectl apply -f -
duet status
