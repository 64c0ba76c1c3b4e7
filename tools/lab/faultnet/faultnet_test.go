package faultnet_test

import (
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"

	"github.com/duet-ha/duet/tools/lab/faultnet"
)

const port = 9000

var (
	addrA = netip.MustParseAddr("10.251.0.1")
	addrB = netip.MustParseAddr("10.251.0.2")
)

// pair is two network namespaces of the test's own, a and b, joined by a
// veth pair (eth0 in each), with a UDP socket bound in each.
type pair struct {
	nsA, nsB     string
	sockA, sockB *net.UDPConn
}

// newPair creates the namespaces, removed at the end of the test. With
// staticNeigh, each side knows the other's MAC address for good, so that no
// ARP is sent and only the test's datagrams cross the link.
func newPair(t *testing.T, staticNeigh bool) *pair {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root: creates network namespaces and loads a BPF program")
	}
	if _, err := exec.LookPath("ip"); err != nil {
		t.Skip("needs iproute2's ip to create the network namespaces")
	}
	suffix := fmt.Sprintf("%06x", rand.IntN(1<<24))
	p := &pair{nsA: "fntest-a-" + suffix, nsB: "fntest-b-" + suffix}
	for _, ns := range []string{p.nsA, p.nsB} {
		ip(t, "netns", "add", ns)
		t.Cleanup(func() { _ = exec.Command("ip", "netns", "del", ns).Run() })
	}
	const macA, macB = "02:fe:00:00:00:0a", "02:fe:00:00:00:0b"
	ip(t, "-n", p.nsA, "link", "add", "eth0", "address", macA, "type", "veth",
		"peer", "name", "eth0", "address", macB, "netns", p.nsB)
	for _, side := range []struct {
		ns          string
		self, other netip.Addr
		otherMAC    string
	}{{p.nsA, addrA, addrB, macB}, {p.nsB, addrB, addrA, macA}} {
		ip(t, "-n", side.ns, "addr", "add", side.self.String()+"/24", "dev", "eth0")
		ip(t, "-n", side.ns, "link", "set", "eth0", "up")
		if staticNeigh {
			ip(t, "-n", side.ns, "neigh", "replace", side.other.String(), "lladdr", side.otherMAC,
				"dev", "eth0", "nud", "permanent")
		}
	}
	p.sockA = listen(t, p.nsA, addrA)
	p.sockB = listen(t, p.nsB, addrB)
	// The link carries frames once both ends' queues are activated, which
	// the kernel does after `ip link set up` returns.
	waitFor(t, "a first datagram from a to b", func() bool {
		send(t, p.sockA, addrB, "hello")
		return len(receive(t, p.sockB, 50*time.Millisecond)) > 0
	})
	waitFor(t, "a first datagram from b to a", func() bool {
		send(t, p.sockB, addrA, "hello")
		return len(receive(t, p.sockA, 50*time.Millisecond)) > 0
	})
	receive(t, p.sockA, 10*time.Millisecond)
	receive(t, p.sockB, 10*time.Millisecond)
	return p
}

// attach attaches a Dropper on b's eth0, skipping the test where the kernel
// cannot run it.
func attach(t *testing.T, p *pair) *faultnet.Dropper {
	t.Helper()
	d, err := faultnet.AttachInNetns(p.nsB, "eth0")
	if errors.Is(err, ebpf.ErrNotSupported) || errors.Is(err, unix.EPERM) {
		t.Skipf("this kernel cannot attach the dropper: %v", err)
	}
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = d.Close() })
	return d
}

func ip(t *testing.T, args ...string) {
	t.Helper()
	if out, err := exec.Command("ip", args...).CombinedOutput(); err != nil {
		t.Fatalf("ip %s: %v: %s", strings.Join(args, " "), err, out)
	}
}

func listen(t *testing.T, ns string, addr netip.Addr) *net.UDPConn {
	t.Helper()
	var conn *net.UDPConn
	err := faultnet.InNetns(ns, func() error {
		var err error
		conn, err = net.ListenUDP("udp4", net.UDPAddrFromAddrPort(netip.AddrPortFrom(addr, port)))
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return conn
}

func send(t *testing.T, from *net.UDPConn, to netip.Addr, payload string) {
	t.Helper()
	if _, err := from.WriteToUDPAddrPort([]byte(payload), netip.AddrPortFrom(to, port)); err != nil {
		t.Fatalf("sending to %s: %v", to, err)
	}
}

// receive returns the datagrams that conn receives within wait.
func receive(t *testing.T, conn *net.UDPConn, wait time.Duration) []string {
	t.Helper()
	var got []string
	buf := make([]byte, 1500)
	if err := conn.SetReadDeadline(time.Now().Add(wait)); err != nil {
		t.Fatal(err)
	}
	for {
		n, err := conn.Read(buf)
		if errors.Is(err, os.ErrDeadlineExceeded) {
			return got
		}
		if err != nil {
			t.Fatalf("receiving: %v", err)
		}
		got = append(got, string(buf[:n]))
	}
}

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func dropped(t *testing.T, d *faultnet.Dropper, src netip.Addr) uint64 {
	t.Helper()
	n, err := d.Dropped(src)
	if err != nil {
		t.Fatal(err)
	}
	return n
}

// TestOneWayLoss drops everything a sends to b: b hears nothing from a
// while a still hears b, until the rule is healed or the dropper closed.
func TestOneWayLoss(t *testing.T) {
	p := newPair(t, true)
	d := attach(t, p)
	if err := d.Drop(addrA, 1); err != nil {
		t.Fatal(err)
	}

	const n = 20
	for i := range n {
		send(t, p.sockA, addrB, fmt.Sprint("a", i))
	}
	// Every datagram is either dropped, and counted, or delivered: once
	// all are counted, none can still be on its way to b.
	waitFor(t, fmt.Sprintf("%d drops from a", n), func() bool { return dropped(t, d, addrA) >= n })
	if got := receive(t, p.sockB, 20*time.Millisecond); len(got) > 0 {
		t.Errorf("b received %q from a while a's frames are dropped", got)
	}
	if got := dropped(t, d, addrA); got != n {
		t.Errorf("dropped %d frames from a, want %d", got, n)
	}

	for i := range n {
		send(t, p.sockB, addrA, fmt.Sprint("b", i))
	}
	if got := receiveN(t, p.sockA, n); len(got) != n {
		t.Errorf("a received %d of b's %d datagrams (%q): the loss must be one-way", len(got), n, got)
	}

	if err := d.Heal(addrA); err != nil {
		t.Fatal(err)
	}
	for i := range n {
		send(t, p.sockA, addrB, fmt.Sprint("healed", i))
	}
	if got := receiveN(t, p.sockB, n); len(got) != n {
		t.Errorf("after Heal, b received %d of a's %d datagrams", len(got), n)
	}
	if got := dropped(t, d, addrA); got != n {
		t.Errorf("after Heal, the count of a's drops is %d, want %d (kept)", got, n)
	}

	if err := d.Drop(addrA, 1); err != nil {
		t.Fatal(err)
	}
	if err := d.Close(); err != nil {
		t.Fatal(err)
	}
	send(t, p.sockA, addrB, "closed")
	if got := receiveN(t, p.sockB, 1); len(got) != 1 {
		t.Error("after Close, b does not receive from a: the program is still attached")
	}
}

// receiveN waits up to 5 s for n datagrams on conn.
func receiveN(t *testing.T, conn *net.UDPConn, n int) []string {
	t.Helper()
	var got []string
	deadline := time.Now().Add(5 * time.Second)
	for len(got) < n && time.Now().Before(deadline) {
		got = append(got, receive(t, conn, 50*time.Millisecond)...)
	}
	return got
}

// TestARPHidden drops a's frames while b has no neighbour entry for a: b's
// ARP requests reach a, but a's replies are dropped, so b cannot send to a
// either, as over a link that lost a's direction.
func TestARPHidden(t *testing.T) {
	p := newPair(t, false)
	d := attach(t, p)
	ip(t, "-n", p.nsB, "neigh", "flush", "dev", "eth0")
	if err := d.Drop(addrA, 1); err != nil {
		t.Fatal(err)
	}

	send(t, p.sockB, addrA, "unresolved")
	waitFor(t, "a dropped ARP reply from a", func() bool { return dropped(t, d, addrA) >= 1 })
	if got := receive(t, p.sockA, 500*time.Millisecond); len(got) > 0 {
		t.Errorf("a received %q from b, though b cannot have learned a's MAC address", got)
	}
	out, err := exec.Command("ip", "-n", p.nsB, "neigh", "show", addrA.String(), "dev", "eth0").CombinedOutput()
	if err != nil {
		t.Fatalf("ip neigh show: %v: %s", err, out)
	}
	if !strings.Contains(string(out), "INCOMPLETE") && !strings.Contains(string(out), "FAILED") {
		t.Errorf("b's neighbour entry for a is %q, want INCOMPLETE or FAILED", strings.TrimSpace(string(out)))
	}

	if err := d.Heal(addrA); err != nil {
		t.Fatal(err)
	}
	send(t, p.sockB, addrA, "resolved")
	// The first datagram may come too, if b was still resolving at Heal.
	var got []string
	waitFor(t, `"resolved" at a`, func() bool {
		got = append(got, receive(t, p.sockA, 50*time.Millisecond)...)
		return strings.Contains(strings.Join(got, " "), "resolved")
	})
}

// TestPartialLoss drops half of a's frames: about half of 1000 datagrams
// arrive, and the drop count accounts for every one that did not.
func TestPartialLoss(t *testing.T) {
	p := newPair(t, true)
	d := attach(t, p)
	if err := d.Drop(addrA, 0.5); err != nil {
		t.Fatal(err)
	}
	var received atomic.Uint64
	go func() {
		buf := make([]byte, 1500)
		_ = p.sockB.SetReadDeadline(time.Time{})
		for {
			if _, err := p.sockB.Read(buf); err != nil {
				return // closed at the end of the test
			}
			received.Add(1)
		}
	}()

	// In batches, each accounted for before the next, so that neither the
	// socket's buffer nor the receive backlog overflows and loses some.
	const total, batch = 1000, 50
	for sent := uint64(batch); sent <= total; sent += batch {
		for i := range batch {
			send(t, p.sockA, addrB, fmt.Sprint(i))
		}
		waitFor(t, fmt.Sprintf("%d datagrams received or dropped", sent), func() bool {
			return received.Load()+dropped(t, d, addrA) >= sent
		})
	}
	got, lost := received.Load(), dropped(t, d, addrA)
	t.Logf("of %d datagrams, %d received and %d dropped", total, got, lost)
	if got+lost != total {
		t.Errorf("received %d + dropped %d != sent %d", got, lost, total)
	}
	if lost < 300 || lost > 700 {
		t.Errorf("dropped %d of %d datagrams at fraction 0.5, want 300 to 700", lost, total)
	}
}
