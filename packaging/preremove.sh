#!/bin/sh
# duet's package, before its files go (deb: prerm; rpm: %preun). Only a
# removal stops the daemon (deb "remove", rpm "0": no version left); an
# upgrade leaves the running daemon alone, and the operator restarts it
# when the peer can take over. A primary that stops hands over to an
# in-sync peer. A failed stop fails the removal: the files stay.
set -e
case "$1" in
remove | 0)
	if [ -d /run/systemd/system ] && systemctl is-active --quiet duet.service; then
		systemctl stop duet.service
	fi
	;;
esac
