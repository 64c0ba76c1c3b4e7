package node

import (
	"context"
	"net"
	"testing"
	"time"

	"github.com/duet-ha/duet/pkg/cluster"
	"github.com/duet-ha/duet/pkg/replica"
	"github.com/duet-ha/duet/pkg/stack"
)

// The cluster loop's and the release rule's timers are CLOCK_BOOTTIME
// readings, which no wall-clock step moves (a review, fortieth session).
// As wall-clock readings, a step back left a witness answer from before
// it counting as "since the loss" (an isolated primary released calls
// the peer, taking over, lacked), and kept a dead peer from being
// declared lost for the size of the step; a step forward declared a live
// peer lost and ended a finite start_wait at once. A wall clock cannot be
// stepped inside a test, so this one checks what the timers are: each
// recorded by the code's own path reads within a second of bootNanos (a
// wall-clock reading is decades away from it).
func TestClusterTimersOnBootClock(t *testing.T) {
	near := func(name string, v int64) {
		t.Helper()
		if d := time.Duration(bootNanos() - v); d < 0 || d > time.Second {
			t.Errorf("%s = %d, %v from CLOCK_BOOTTIME's now: not a boot-clock reading (a wall-clock step would move it)", name, v, d)
		}
	}
	// The start wait.
	dir := t.TempDir()
	const e = 4<<8 | 1
	primWithMark(t, dir, e, cluster.Peer{Seen: true, Name: "nodeB", State: cluster.Second, Epoch: e})
	rn, _ := restarted(t, dir, "10m")
	near("started", rn.started.Load())

	// The peer's loss: a PRIM whose SECOND fell silent goes ALONE.
	n := loopNode(t)
	n.server = &replica.Server{}
	n.stack = &stack.Stack{Log: n.log}
	n.cfg.Cluster.Interval, n.cfg.Cluster.Timeout = 100*time.Millisecond, 400*time.Millisecond
	const e2 = 5<<8 | 2
	m := cluster.Machine{Name: "nodeB", ID: 2, State: cluster.Prim, Epoch: e2,
		Peer: cluster.Peer{Seen: true, Name: "nodeA", State: cluster.Second, Epoch: e2, Boot: 1, Seq: 1}}
	n.machine.Store(&m)
	n.lastHeartbeat.Store(bootNanos())
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		n.loop(ctx, m)
	}()
	defer func() {
		cancel()
		<-done
	}()
	for end := time.Now().Add(10 * n.cfg.Cluster.Timeout); n.machine.Load().State != cluster.Alone; time.Sleep(10 * time.Millisecond) {
		if time.Now().After(end) {
			t.Fatalf("peer silent for %v: still %s", 10*n.cfg.Cluster.Timeout, n.machine.Load().State)
		}
	}
	near("peerLostAt", n.peerLostAt.Load())

	// The witness's answer, and the rule that releases calls after a
	// loss only once the witness answered since it.
	w := testNode(t, t.TempDir())
	w.cfg.Cluster.Witness = "127.0.0.1"
	if err := w.pingWitness(); err != nil {
		t.Skipf("cannot ping a witness here: %v", err)
	}
	w.peerLostAt.Store(bootNanos())
	if ok, why := w.witnessCheck(); !ok {
		t.Fatal(why)
	}
	near("witnessOK", w.witnessOK.Load())
	w.witnessOK.Store(w.peerLostAt.Load() - int64(time.Minute)) // answered a minute before the loss
	w.machine.Store(&cluster.Machine{Name: "nodeA", ID: 1, State: cluster.Alone, Epoch: e})
	w.announcedAlone.Store(e)
	if w.tryRelease() {
		t.Fatal("ALONE, the witness not heard since the peer was lost, yet a durability call is released")
	}
}

// TestHeartbeatRecordedOnBootClock: lastHeartbeat as receiveHeartbeats
// records it is a boot-clock reading (TestClusterTimersOnBootClock checks
// the others; a review found every test passing with this one back on
// the wall clock, where bootSince of it is negative and a dead peer is
// never declared lost).
func TestHeartbeatRecordedOnBootClock(t *testing.T) {
	probe, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	port := probe.LocalAddr().(*net.UDPAddr).Port
	probe.Close()
	a := startHeartbeats(t, "nodeA", "127.0.0.2", "127.0.0.3", port, nil)
	b := startHeartbeats(t, "nodeB", "127.0.0.3", "127.0.0.2", port, nil)
	start := time.Now()
	a.waitHeard(t, start, 5*time.Second)
	b.waitHeard(t, start, 5*time.Second)
	for _, r := range []*udpRun{a, b} {
		v := r.n.lastHeartbeat.Load()
		if d := bootSince(v); d < 0 || d > time.Second {
			t.Errorf("%s: lastHeartbeat %d is %v from CLOCK_BOOTTIME's now: not a boot-clock reading", r.n.cfg.Node, v, d)
		}
	}
}
