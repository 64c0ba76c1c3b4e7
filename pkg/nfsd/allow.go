package nfsd

import (
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"time"
)

// AllowListener accepts connections only from addresses in allow, and
// from the loopback (the health check). Others are closed at once, and
// logged at most once a minute. With allow empty every client is served.
type AllowListener struct {
	net.Listener
	Allow  []netip.Prefix
	Log    *slog.Logger
	logged time.Time
	held   int
}

// ParseAllow parses client networks given as CIDRs or single addresses.
func ParseAllow(specs []string) ([]netip.Prefix, error) {
	var out []netip.Prefix
	for _, s := range specs {
		if p, err := netip.ParsePrefix(s); err == nil {
			out = append(out, p.Masked())
			continue
		}
		a, err := netip.ParseAddr(s)
		if err != nil {
			return nil, fmt.Errorf("client network %q: want a CIDR such as 192.168.10.0/24 or an address", s)
		}
		out = append(out, netip.PrefixFrom(a, a.BitLen()))
	}
	return out, nil
}

// allowed says whether a client at addr may connect.
func (l *AllowListener) allowed(addr net.Addr) (netip.Addr, bool) {
	ap, err := netip.ParseAddrPort(addr.String())
	if err != nil {
		return netip.Addr{}, false
	}
	a := ap.Addr().Unmap()
	if len(l.Allow) == 0 || a.IsLoopback() {
		return a, true
	}
	for _, p := range l.Allow {
		if p.Contains(a) {
			return a, true
		}
	}
	return a, false
}

// Accept returns the next connection from an allowed client.
func (l *AllowListener) Accept() (net.Conn, error) {
	for {
		c, err := l.Listener.Accept()
		if err != nil {
			return nil, err
		}
		a, ok := l.allowed(c.RemoteAddr())
		if ok {
			return c, nil
		}
		c.Close()
		l.held++
		if l.Log != nil && time.Since(l.logged) >= time.Minute {
			l.Log.Warn("NFS client refused: not in the allowed client networks", "client", a, "refused_since_last_warning", l.held)
			l.logged, l.held = time.Now(), 0
		}
	}
}
