package node

import (
	"testing"

	"github.com/duet-ha/duet/pkg/cluster"
)

// TestLeavingAloneHeartbeatsStopSayingSynced: a primary whose
// peer cannot take over (its copy is stale: here the peer's duet was
// stopped, so it still receives the stream, says stale and echoes our
// heartbeats) leaves the role (`duet stop`, no peer in sync): beginLeaving
// finds leavingAlone, and the services' shutdown flushes are released
// alone. While the node leaves, the heartbeats repeat what they said
// before (lastSynced: "synced"), even after a release without the peer.
// A peer started meanwhile (`duet start`: WAIT, stale) turns SECOND on
// that "synced" and counts as up to date: if this node then dies before
// its unserve shipped the released change (SIGKILL, systemd's stop
// timeout, a host crash), or WaitShipped times out and it goes STOP, the
// peer takes over without the acknowledged write. Outside a leave, a
// release turns "synced" off at once (releasedAlone).
func TestLeavingAloneHeartbeatsStopSayingSynced(t *testing.T) {
	const e = 4<<8 | 1
	n := testNode(t, t.TempDir())
	n.cfg.Node = "nodeA"
	var err error
	if n.guard, err = newGuard(n.cfg); err != nil {
		t.Fatal(err)
	}
	// The peer nodeB was stopped by the operator: STOP, stale, and its
	// heartbeats echo our latest (it applies them).
	peer := cluster.Peer{Seen: true, Name: "nodeB", State: cluster.Stop, Epoch: e, Stale: true,
		EchoBoot: n.guard.Boot(), EchoTime: hbClock()}
	n.machine.Store(&cluster.Machine{Name: "nodeA", ID: 1, State: cluster.Prim, Epoch: e, Peer: peer})
	// The last heartbeat before the leave said "synced": the stream to
	// nodeB works and nothing was released alone since the last catch-up.
	n.lastSynced.Store(true)

	// duet stop on nodeA: no peer ready, unserve(STOP).
	n.beginLeaving(false)
	if !n.leavingAlone.Load() {
		t.Fatal("the test sees nothing: the leave is not alone")
	}
	// A service's shutdown flush: released without the peer.
	if !n.tryRelease() {
		t.Fatal("the test sees nothing: the call was not released alone")
	}
	h := n.heartbeat()

	// nodeB's operator runs duet start: WAIT, stale; then it hears h.
	b := cluster.Machine{Name: "nodeB", ID: 2, State: cluster.Wait, Epoch: e, Stale: true}
	b, _ = cluster.Step(b, cluster.Event{Kind: cluster.EvPeer, Peer: h.Peer()})
	if h.Synced || b.State == cluster.Second {
		t.Fatalf("after a durability call was released without nodeB, nodeA's heartbeat says synced=%v and nodeB turns %s (stale=%v): "+
			"nodeB can now take over without the acknowledged write", h.Synced, b.State, b.Stale)
	}
}
