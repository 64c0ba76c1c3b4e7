#!/bin/sh
# duet's package, after install or upgrade (deb: configure; rpm: %post).
# systemd learns of the new unit; the service is neither enabled nor
# started nor restarted: an HA daemon must not run before duet init (or
# the operator) wrote /etc/duet/duet.yaml on both nodes, and on an upgrade
# the operator restarts it when the peer can take over (see README).
set -e
if [ -d /run/systemd/system ]; then
	systemctl daemon-reload
fi
