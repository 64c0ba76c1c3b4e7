package node

import (
	"context"
	"log/slog"
	"net"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/duet-ha/duet/pkg/cluster"
	"github.com/duet-ha/duet/pkg/config"
)

// countingHandler counts the records logged at each level.
type countingHandler struct {
	errors, warns atomic.Int64
}

func (h *countingHandler) Enabled(context.Context, slog.Level) bool { return true }
func (h *countingHandler) Handle(_ context.Context, r slog.Record) error {
	switch {
	case r.Level >= slog.LevelError:
		h.errors.Add(1)
	case r.Level >= slog.LevelWarn:
		h.warns.Add(1)
	}
	return nil
}
func (h *countingHandler) WithAttrs([]slog.Attr) slog.Handler { return h }
func (h *countingHandler) WithGroup(string) slog.Handler      { return h }

// TestReflectedHeartbeatsFloodTheLog: an attacker without the key
// records one heartbeat that nodeB sends (it crosses the LAN every
// interval) and sends it back to nodeB from the peer's address (UDP: the
// source address is the attacker's to write). Its MAC is good (one key,
// no direction in it) and it comes from the peer's address, so it passes
// both checks, and each copy then logs an error "heartbeat carries this
// node's own name", with no rate limit (the refusals above it are logged
// once per 30 s): a packet per log line, as fast as the attacker sent
// (a review). Now once per 30 s too.
func TestReflectedHeartbeatsFloodTheLog(t *testing.T) {
	probe, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	port := probe.LocalAddr().(*net.UDPAddr).Port
	probe.Close()
	counts := &countingHandler{}
	cfg := &config.Config{Node: "nodeB", Cluster: config.Cluster{HeartbeatPort: port, Interval: udpInterval, Timeout: udpTimeout,
		Networks: []config.Network{{Local: "127.0.0.2", Peer: "127.0.0.1"}}}}
	key := []byte("0123456789abcdef")
	n := &Node{cfg: cfg, log: slog.New(counts), keys: [][]byte{key},
		events: make(chan cluster.Event, 64), hbKick: make(chan struct{}, 1), barrierTimeout: defaultBarrierTimeout}
	if n.guard, err = newGuard(cfg); err != nil {
		t.Fatal(err)
	}
	n.machine.Store(&cluster.Machine{Name: "nodeB", State: cluster.Second})
	conns, peers, err := n.heartbeatConns()
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	wg.Add(1)
	go func() { defer wg.Done(); n.receiveHeartbeats(ctx, conns[0], peers[0]) }()
	defer func() { cancel(); conns[0].Close(); wg.Wait() }()

	// What the attacker recorded: one heartbeat nodeB sent.
	h := n.heartbeat()
	pkt := h.Marshal(n.heartbeatKey())

	// Sent back from the peer's address (any port).
	atk, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	defer atk.Close()
	to, _ := net.ResolveUDPAddr("udp4", net.JoinHostPort("127.0.0.2", strconv.Itoa(port)))
	const sent = 2000
	for i := range sent {
		atk.WriteToUDP(pkt, to)
		if i%100 == 99 {
			time.Sleep(2 * time.Millisecond) // let the receiver keep up
		}
	}
	time.Sleep(300 * time.Millisecond)
	t.Logf("%d replayed copies of nodeB's own heartbeat: %d errors, %d warnings logged", sent, counts.errors.Load(), counts.warns.Load())
	if got := counts.errors.Load() + counts.warns.Load(); got > 5 {
		t.Errorf("an attacker without the key made nodeB log %d lines by sending it %d copies of its own heartbeat", got, sent)
	}
}
