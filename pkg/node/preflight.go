package node

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"strconv"
	"syscall"

	"github.com/duet-ha/duet/pkg/capture"
	"github.com/duet-ha/duet/pkg/config"
	"github.com/duet-ha/duet/pkg/vip"
)

// Preflight checks, without changing anything, what Run needs of this
// host beyond a valid configuration (duet run --check): each replicated
// directory's filesystem, the VIP's interface, that listen and the
// heartbeat addresses are this host's and their ports free (unless a
// daemon runs with this configuration), and that the BPF programs load.
// It returns what it found, one line each (the hooks the programs would
// attach among them), and every problem, each naming its setting and
// the fix.
func Preflight(cfg *config.Config) (found []string, problems []error) {
	bad := func(format string, a ...any) { problems = append(problems, fmt.Errorf(format, a...)) }
	var opts capture.Options
	opts.RingBytes = uint32(cfg.RingBufferKiB) << 10
	for i, r := range cfg.Replicate {
		t, err := checkTree(i, r.Path)
		if err != nil {
			problems = append(problems, err)
			continue
		}
		opts.Devices = append(opts.Devices, t.dev)
		opts.XFS = opts.XFS || t.xfs
		kind := "ext4"
		switch {
		case t.xfs:
			kind = "XFS"
		case t.btrfs != 0:
			kind = "btrfs"
			opts.Btrfs = append(opts.Btrfs, t.btrfs)
		}
		found = append(found, fmt.Sprintf("replicate %s %q: %s", r.Name, r.Path, kind))
	}
	if v := cfg.VIP; v != nil {
		p, _ := netip.ParsePrefix(v.Address)
		if err := (vip.VIP{Prefix: p, Iface: v.Interface}).Check(); err != nil {
			bad("vip.interface: %v", err)
		} else {
			found = append(found, fmt.Sprintf("vip %s on %s: the interface is up", v.Address, v.Interface))
		}
	}
	local, err := localAddrs()
	if err != nil {
		bad("listing this host's addresses: %v", err)
	}
	isLocal := func(field, value, host, fix string) bool {
		a, err := netip.ParseAddr(host)
		if err != nil || local == nil || a.IsUnspecified() || local[a.Unmap()] {
			return true
		}
		bad("%s %q: %s is not an address of this host (see `ip -br addr`): %s", field, value, host, fix)
		return false
	}
	// Ports held by this configuration's running daemon are its own:
	// --check after an edit, before a restart, is the usual case.
	running := false
	if c, err := net.Dial("unix", cfg.Socket); err == nil {
		c.Close()
		running = true
		found = append(found, fmt.Sprintf("a duet daemon runs with socket %s: its ports are not checked", cfg.Socket))
	}
	free := func(field, network, addr string) {
		if running {
			return
		}
		var err error
		if network == "udp" {
			var c net.PacketConn
			if c, err = net.ListenPacket("udp4", addr); err == nil {
				c.Close()
			}
		} else {
			var l net.Listener
			if l, err = net.Listen("tcp", addr); err == nil {
				l.Close()
			}
		}
		switch {
		case errors.Is(err, syscall.EADDRINUSE):
			bad("%s %q: %s port in use by another program (see `ss -lnp`): stop it or pick another port", field, addr, network)
		case err != nil:
			bad("%s %q: %v", field, addr, err)
		default:
			found = append(found, fmt.Sprintf("%s %s (%s): free", field, addr, network))
		}
	}
	if host, _, err := net.SplitHostPort(cfg.Listen); err == nil && isLocal("listen", cfg.Listen, host, "set this node's own address") {
		free("listen", "tcp", cfg.Listen)
	}
	port := strconv.Itoa(cfg.Cluster.HeartbeatPort)
	for i, n := range cfg.Cluster.Networks {
		if isLocal(fmt.Sprintf("cluster.networks[%d].local", i), n.Local, n.Local, "set this node's own address on that network") {
			free(fmt.Sprintf("cluster.networks[%d] heartbeats", i), "udp", net.JoinHostPort(n.Local, port))
		}
	}
	if cfg.Metrics != "off" {
		free("metrics", "tcp", cfg.Metrics)
	}
	if len(opts.Devices) == len(cfg.Replicate) {
		c, err := capture.Load(opts)
		if err != nil {
			bad("capture: %v (duet needs root, and a kernel with BTF and BPF tracing: see docs/CAPTURE.md)", err)
		} else {
			hooks := c.Planned()
			c.Close()
			found = append(found, fmt.Sprintf("capture: the BPF programs load; on taking the primary role it attaches %d hooks:", len(hooks)))
			for _, h := range hooks {
				opt := ""
				if !h.Required {
					opt = " (if this kernel has it)"
				}
				found = append(found, fmt.Sprintf("  %s %s%s", h.Type, h.Name, opt))
			}
		}
	}
	return found, problems
}

// localAddrs returns the addresses of this host's interfaces.
func localAddrs() (map[netip.Addr]bool, error) {
	addrs, err := net.InterfaceAddrs()
	if err != nil {
		return nil, err
	}
	m := map[netip.Addr]bool{}
	for _, a := range addrs {
		if n, ok := a.(*net.IPNet); ok {
			if ip, ok := netip.AddrFromSlice(n.IP); ok {
				m[ip.Unmap()] = true
			}
		}
	}
	return m, nil
}
