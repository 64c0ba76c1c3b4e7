package nfsclient

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"os"
	"syscall"

	"golang.org/x/sys/unix"
)

// The ports DialReserved takes, as bindresvport(3): privileged (below
// IPPORT_RESERVED, 1024), above the well-known services'.
const (
	resvLow  = 600
	resvHigh = 1023
)

// DialReserved connects to addr from a privileged source port, as a
// Linux mount does (its resvport option, the default): a server with
// knfsd's `secure` export option, or duet's NFS server without
// --insecure, refuses calls from any other. Only root (CAP_NET_BIND_SERVICE)
// may bind such a port. d's other fields apply; the IP of d.LocalAddr,
// if set, is kept. Ports in use are skipped, from a random first one.
func DialReserved(ctx context.Context, d net.Dialer, network, addr string) (net.Conn, error) {
	var ip net.IP
	var zone string
	if la, ok := d.LocalAddr.(*net.TCPAddr); ok {
		ip, zone = la.IP, la.Zone
	}
	// A port a closed connection left in TIME_WAIT may be bound again;
	// connect still refuses the same four-tuple (EADDRNOTAVAIL), and the
	// next port is tried.
	control, controlCtx := d.Control, d.ControlContext
	d.Control = nil
	d.ControlContext = func(ctx context.Context, network, address string, c syscall.RawConn) error {
		switch {
		case controlCtx != nil:
			if err := controlCtx(ctx, network, address, c); err != nil {
				return err
			}
		case control != nil:
			if err := control(network, address, c); err != nil {
				return err
			}
		}
		var serr error
		if err := c.Control(func(fd uintptr) {
			serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_REUSEADDR, 1)
		}); err != nil {
			return err
		}
		return serr
	}
	n := resvHigh - resvLow + 1
	first := rand.IntN(n)
	var last error
	for i := range n {
		d.LocalAddr = &net.TCPAddr{IP: ip, Zone: zone, Port: resvLow + (first+i)%n}
		c, err := d.DialContext(ctx, network, addr)
		if err == nil {
			return c, nil
		}
		if errors.Is(err, unix.EACCES) || errors.Is(err, unix.EPERM) {
			return nil, fmt.Errorf("dialing %s from a privileged port: %w (only root may bind one)", addr, err)
		}
		var se *os.SyscallError
		if errors.As(err, &se) && se.Syscall == "bind" && errors.Is(err, unix.EADDRNOTAVAIL) {
			// The local address is not this host's: no port will do.
			return nil, err
		}
		if !errors.Is(err, unix.EADDRINUSE) && !errors.Is(err, unix.EADDRNOTAVAIL) {
			return nil, err
		}
		if ctx.Err() != nil {
			return nil, ctx.Err()
		}
		last = err
	}
	return nil, fmt.Errorf("dialing %s: no privileged source port free (%d to %d): %w", addr, resvLow, resvHigh, last)
}
