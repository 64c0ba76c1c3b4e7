#!/usr/bin/env bash
# Shared by the provisioning scripts: the K3S token and database password
# are derived from the lab's name so that every VM agrees without a shared
# folder. A lab only: real sites use `duet init k3s` and copy the files.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive

lab_secret() { # name
	printf 'duet-vagrant-lab-%s' "$1" | sha256sum | cut -c1-32
}

iface_of() { # address
	ip -o -4 addr show | awk -v a="$1" '$4 ~ "^"a"/" {print $2; exit}'
}

install_k3s() { # extra args for the k3s installer
	if command -v k3s >/dev/null; then
		return 0
	fi
	curl -sfL https://get.k3s.io -o /tmp/k3s-install.sh
	K3S_TOKEN=$(lab_secret k3s-token) INSTALL_K3S_EXEC="$*" sh /tmp/k3s-install.sh
}
