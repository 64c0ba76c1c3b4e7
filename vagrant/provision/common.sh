#!/usr/bin/env bash
# Shared by the provisioning scripts: the K3S token and database password
# are derived from the lab's name so that every VM agrees without a shared
# folder. A lab only: real sites use `duet init k3s` and copy the files.
# Environment: DUET_K3S_VERSION, the K3S release to install (the
# Vagrantfile sets it; not K3S_*, which the installer hands to K3S).
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive

lab_secret() { # name
	printf 'duet-vagrant-lab-%s' "$1" | sha256sum | cut -c1-32
}

iface_of() { # address
	ip -o -4 addr show | awk -v a="$1" '$4 ~ "^"a"/" {print $2; exit}'
}

# wait_for SECONDS WHAT COMMAND...: runs COMMAND every 5 s until it
# succeeds; after SECONDS, says what did not happen and fails.
wait_for() {
	local limit=$1 what=$2 end=$((SECONDS + $1))
	shift 2
	until "$@" >/dev/null 2>&1; do
		if [ "$SECONDS" -ge "$end" ]; then
			echo "provision: $what: not after $limit s" >&2
			return 1
		fi
		sleep 5
	done
}

tcp_open() { # host port
	timeout 3 bash -c "exec 3<>/dev/tcp/$1/$2"
}

# install_k3s UNIT ARGS...: installs K3S $DUET_K3S_VERSION as the systemd unit
# UNIT (k3s for a server, k3s-agent for an agent) with ARGS, and starts
# it. The K3S_* variables of the caller's environment (token, datastore
# endpoint, server URL) go to the unit's environment file, mode 0600, out
# of the command line that ps shows. K3S's unit waits for its datastore
# without a time limit (TimeoutStartSec=0): it is started here without
# waiting, and the caller waits for it with a bound.
install_k3s() {
	local unit=$1
	shift
	if ! command -v k3s >/dev/null; then
		curl -sfL --retry 3 --max-time 120 https://get.k3s.io -o /tmp/k3s-install.sh
		K3S_TOKEN=$(lab_secret k3s-token) INSTALL_K3S_VERSION="$DUET_K3S_VERSION" INSTALL_K3S_SKIP_START=true \
			INSTALL_K3S_EXEC="$*" sh /tmp/k3s-install.sh
	fi
	systemctl start --no-block "$unit"
}
