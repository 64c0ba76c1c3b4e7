package node

import (
	"context"
	"log/slog"
	"net"
	"os"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/duet-ha/duet/pkg/cluster"
	"github.com/duet-ha/duet/pkg/config"
)

const (
	udpInterval = 100 * time.Millisecond
	udpTimeout  = 500 * time.Millisecond
)

// udpRun is one daemon run's heartbeat part, and what its receivers
// accepted (when, from which node).
type udpRun struct {
	n     *Node
	stop  func()
	mu    sync.Mutex
	heard []time.Time
}

// startHeartbeats starts the heartbeats of a node at local whose peer is
// at peer; they are sent to sendTo if not nil.
func startHeartbeats(t *testing.T, name, local, peer string, port int, sendTo *net.UDPAddr) *udpRun {
	return startHeartbeatsKeys(t, [][]byte{[]byte("0123456789abcdef")}, name, local, peer, port, sendTo)
}

// startHeartbeatsKeys is startHeartbeats with the cluster keys keys.
func startHeartbeatsKeys(t *testing.T, keys [][]byte, name, local, peer string, port int, sendTo *net.UDPAddr) *udpRun {
	cfg := &config.Config{Node: name, Cluster: config.Cluster{HeartbeatPort: port, Interval: udpInterval, Timeout: udpTimeout,
		Networks: []config.Network{{Local: local, Peer: peer}}}}
	n := &Node{cfg: cfg, log: slog.New(slog.NewTextHandler(os.Stderr, nil)), keys: keys,
		events: make(chan cluster.Event, 64), hbKick: make(chan struct{}, 1), barrierTimeout: defaultBarrierTimeout}
	var err error
	if n.guard, err = newGuard(cfg); err != nil {
		t.Fatal(err)
	}
	n.machine.Store(&cluster.Machine{Name: name, State: cluster.Wait})
	conns, peers, err := n.heartbeatConns()
	if err != nil {
		t.Fatal(err)
	}
	send := peers
	if sendTo != nil {
		send = []*net.UDPAddr{sendTo}
	}
	r := &udpRun{n: n}
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	wg.Add(3)
	go func() { defer wg.Done(); n.receiveHeartbeats(ctx, conns[0], peers[0]) }()
	go func() { defer wg.Done(); n.sendHeartbeats(ctx, conns, send) }()
	go func() {
		defer wg.Done()
		for {
			select {
			case <-ctx.Done():
				return
			case ev := <-n.events:
				n.peerApplied(ev.Peer) // as the loop does
				r.mu.Lock()
				r.heard = append(r.heard, time.Now())
				r.mu.Unlock()
			}
		}
	}()
	r.stop = func() {
		cancel()
		conns[0].Close()
		wg.Wait()
	}
	t.Cleanup(r.stop)
	return r
}

// heardSince is when r first accepted a heartbeat after t, or the zero
// time.
func (r *udpRun) heardSince(t time.Time) time.Time {
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, h := range r.heard {
		if h.After(t) {
			return h
		}
	}
	return time.Time{}
}

func (r *udpRun) waitHeard(t *testing.T, since time.Time, within time.Duration) time.Duration {
	t.Helper()
	for deadline := time.Now().Add(5 * time.Second); time.Now().Before(deadline); time.Sleep(5 * time.Millisecond) {
		if h := r.heardSince(since); !h.IsZero() {
			if d := h.Sub(since); d > within {
				t.Errorf("%s heard its peer %v after the start, want within %v", r.n.cfg.Node, d.Round(time.Millisecond), within)
			}
			return h.Sub(since)
		}
	}
	t.Fatalf("%s never heard its peer", r.n.cfg.Node)
	return 0
}

// TestHeartbeatsOverUDP runs two nodes' heartbeats over loopback, nodeA's
// through a relay that records them: the nodes hear each other, a
// restarted nodeA and nodeB hear each other within an interval, and the recorded
// heartbeats of nodeA's two runs replayed after it stopped are not heard.
func TestHeartbeatsOverUDP(t *testing.T) {
	probe, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	port := probe.LocalAddr().(*net.UDPAddr).Port
	probe.Close()
	addr := func(host string) *net.UDPAddr {
		a, _ := net.ResolveUDPAddr("udp4", net.JoinHostPort(host, strconv.Itoa(port)))
		return a
	}
	// The relay (the attacker on the path) sends from nodeA's address:
	// the source check looks at the address, not the port.
	in, err := net.ListenUDP("udp4", addr("127.0.0.3"))
	if err != nil {
		t.Fatal(err)
	}
	out, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	defer out.Close()
	var b *udpRun
	var rmu sync.Mutex
	var recorded [][]byte
	go func() {
		buf := make([]byte, 2048)
		for {
			sz, _, err := in.ReadFromUDP(buf)
			if err != nil {
				return
			}
			rmu.Lock()
			recorded = append(recorded, append([]byte(nil), buf[:sz]...))
			rmu.Unlock()
			out.WriteToUDP(buf[:sz], addr("127.0.0.2"))
		}
	}()
	defer in.Close()

	record := func(rec *[][]byte) {
		rmu.Lock()
		defer rmu.Unlock()
		*rec, recorded = recorded, nil
	}
	// Each run of nodeA heard both ways, and 10 of its heartbeats
	// recorded.
	runA := func() (*udpRun, time.Duration) {
		started := time.Now()
		a := startHeartbeats(t, "nodeA", "127.0.0.1", "127.0.0.2", port, addr("127.0.0.3"))
		// Each side answers a heartbeat that echoes none of its run at
		// once: both hear each other within an interval of the start
		// (without the answer, nodeA waited for nodeB's next tick, and
		// nodeB for nodeA's: about 3 intervals). Allowed 2: on a loaded
		// machine the start itself took 101 ms once.
		d := b.waitHeard(t, started, 2*udpInterval)
		a.waitHeard(t, started, 2*udpInterval)
		for deadline := time.Now().Add(5 * time.Second); time.Now().Before(deadline); time.Sleep(udpInterval) {
			rmu.Lock()
			n := len(recorded)
			rmu.Unlock()
			if n >= 10 {
				break
			}
		}
		return a, d
	}

	b = startHeartbeats(t, "nodeB", "127.0.0.2", "127.0.0.1", port, nil)
	var first, second [][]byte
	a, _ := runA()
	a.stop()
	record(&first)
	// The restart: heard within two intervals (and some scheduling slack
	// for a loaded test host).
	a, d := runA()
	t.Logf("restarted nodeA heard after %v", d.Round(time.Millisecond))
	a.stop()
	record(&second)

	// Heartbeats nodeA sent before it stopped are heard while young
	// enough: replay only once they are older than the timeout.
	time.Sleep(udpTimeout + udpInterval)
	replayed := time.Now()
	for i := range min(len(first), len(second)) {
		out.WriteToUDP(first[i], addr("127.0.0.2"))
		out.WriteToUDP(second[i], addr("127.0.0.2"))
	}
	// Nothing can be waited for: nodeB refuses the replay silently. A
	// timeout is what it would take to declare nodeA lost.
	time.Sleep(udpTimeout)
	if h := b.heardSince(replayed); !h.IsZero() {
		t.Fatalf("nodeB heard nodeA %v after the heartbeats of its two stopped runs were replayed", h.Sub(replayed))
	}
	t.Logf("replayed %d recorded heartbeats of two stopped runs: none heard", 2*min(len(first), len(second)))
}

// A key rotation (docs/SECURITY.md): the node given the new key as key
// and the old one as previous_key hears its peer, which has only the old
// key, and is heard by it; so in the next steps. Nodes with unrelated
// keys do not hear each other.
func TestHeartbeatsKeyRotation(t *testing.T) {
	old, new, other := []byte("old key 0123456789"), []byte("new key 0123456789"), []byte("other key 0123456789")
	for _, tc := range []struct {
		name string
		a, b [][]byte
		hear bool
	}{
		{"B rotated", [][]byte{old}, [][]byte{new, old}, true},
		{"both rotated", [][]byte{new, old}, [][]byte{new, old}, true},
		{"B dropped the old key", [][]byte{new, old}, [][]byte{new}, true},
		{"unrelated keys", [][]byte{old}, [][]byte{other}, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			probe, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
			if err != nil {
				t.Fatal(err)
			}
			port := probe.LocalAddr().(*net.UDPAddr).Port
			probe.Close()
			started := time.Now()
			a := startHeartbeatsKeys(t, tc.a, "nodeA", "127.0.0.1", "127.0.0.2", port, nil)
			b := startHeartbeatsKeys(t, tc.b, "nodeB", "127.0.0.2", "127.0.0.1", port, nil)
			if !tc.hear {
				time.Sleep(udpTimeout) // nothing to wait for: a timeout is what declares the peer lost
				if !a.heardSince(started).IsZero() || !b.heardSince(started).IsZero() {
					t.Fatal("nodes with unrelated keys heard each other")
				}
				return
			}
			// Within a timeout: neither declares the other lost.
			a.waitHeard(t, started, udpTimeout)
			b.waitHeard(t, started, udpTimeout)
		})
	}
}
