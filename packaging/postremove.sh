#!/bin/sh
# duet's package, after its files went or were replaced (deb: postrm; rpm:
# %postun): systemd forgets a removed unit and rereads a replaced one.
set -e
if [ -d /run/systemd/system ]; then
	systemctl daemon-reload
fi
