package nfsd

import (
	"net"
	"net/netip"
	"strings"
	"testing"
)

type fakeAddr string

func (a fakeAddr) Network() string { return "tcp" }
func (a fakeAddr) String() string  { return string(a) }

func TestAllowListener(t *testing.T) {
	allow, err := ParseAllow([]string{"10.250.0.0/24", "192.168.1.7", "fd00::/64"})
	if err != nil {
		t.Fatal(err)
	}
	l := &AllowListener{Allow: allow}
	for _, tc := range []struct {
		addr string
		ok   bool
	}{
		{"10.250.0.3:900", true},
		{"10.250.1.3:900", false},
		{"192.168.1.7:1", true},
		{"192.168.1.8:1", false},
		{"127.0.0.1:5", true}, // the health check
		{"[::ffff:10.250.0.9]:7", true},
		{"[fd00::1]:7", true},
		{"[fd01::1]:7", false},
		{"nonsense", false},
	} {
		if _, ok := l.allowed(fakeAddr(tc.addr)); ok != tc.ok {
			t.Errorf("%s: allowed %v, want %v", tc.addr, ok, tc.ok)
		}
	}
	if _, ok := (&AllowListener{}).allowed(fakeAddr("203.0.113.5:1")); !ok {
		t.Error("no list: every client is served")
	}
	if _, err := ParseAllow([]string{"10.0.0.0/33"}); err == nil || !strings.Contains(err.Error(), `client network "10.0.0.0/33"`) {
		t.Errorf("bad CIDR: %v", err)
	}
}

// fakeListener hands out pipe ends that claim the given remote addresses.
type fakeListener struct{ addrs []string }

type fromConn struct {
	net.Conn
	from string
}

func (c fromConn) RemoteAddr() net.Addr { return fakeAddr(c.from) }

func (f *fakeListener) Accept() (net.Conn, error) {
	if len(f.addrs) == 0 {
		return nil, net.ErrClosed
	}
	a, b := net.Pipe()
	go func() { // the client's end: report when the server closes it
		buf := make([]byte, 1)
		b.Read(buf)
		b.Close()
	}()
	from := f.addrs[0]
	f.addrs = f.addrs[1:]
	return fromConn{Conn: a, from: from}, nil
}
func (f *fakeListener) Close() error   { return nil }
func (f *fakeListener) Addr() net.Addr { return fakeAddr("192.0.2.1:2049") }

// Accept closes refused clients and returns the first allowed one.
func TestAllowListenerAccept(t *testing.T) {
	fl := &fakeListener{addrs: []string{"203.0.113.9:1000", "198.51.100.1:1", "10.250.0.7:2000"}}
	l := &AllowListener{Listener: fl, Allow: []netip.Prefix{netip.MustParsePrefix("10.250.0.0/24")}}
	c, err := l.Accept()
	if err != nil {
		t.Fatal(err)
	}
	if got := c.RemoteAddr().String(); got != "10.250.0.7:2000" {
		t.Fatalf("accepted %s, want the allowed client 10.250.0.7:2000", got)
	}
	if l.held != 2 {
		t.Errorf("%d refused, want 2", l.held)
	}
	if _, err := l.Accept(); err == nil {
		t.Error("accepted past the end")
	}
}
