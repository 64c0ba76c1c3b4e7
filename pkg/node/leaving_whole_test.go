package node

import (
	"testing"
	"time"

	"github.com/duet-ha/duet/pkg/cluster"
)

// From a second review (forty-first session) of d0aac90.

// TestLeaveWholeWithinHeartbeatUndoesSwap: heartbeat() now reads leaving
// before the machine and again under relMu, which closes the window of
// TestLeaveEndHeartbeatUndoesSwap only when the heartbeat overlaps one
// end of the leave. A heartbeat that reads leaving (false) and the
// machine (PRIM) before beginLeaving, and reaches relMu only after the
// loop published the handover and cleared leaving, sees "not leaving"
// both times, with the term's primaries gone: "PRIM, not synced", and the
// receiver goes stale and ignores the handover, as before the change.
// smu (servingPrimaries; stopPrimary takes it for writing during the
// leave) stands in for the stall: a heartbeat that asks for it while
// stopPrimary holds it waits for the leave's stop.
func TestLeaveWholeWithinHeartbeatUndoesSwap(t *testing.T) {
	const e = 5<<8 | 1
	n, prim := primaryNodeA(t, e)
	published, _ := cluster.Step(prim, cluster.Event{Kind: cluster.EvCmdSwap})
	n.machine.Store(&prim)
	n.lastSynced.Store(true)
	n.markOn, n.markEpoch, n.savedPrim = true, e, 0

	n.smu.Lock()
	got := make(chan cluster.Heartbeat)
	go func() { got <- n.heartbeat() }()
	time.Sleep(100 * time.Millisecond) // read leaving (false) and the machine (PRIM); waits for smu
	n.beginLeaving(false)              // the leave: stops the primaries (none here), hands over
	n.machine.Store(&published)        // the loop publishes WAIT+HandedOver
	n.leaving.Store(false)             // and clears leaving
	n.smu.Unlock()
	h1 := <-got
	h2 := n.heartbeat()

	recv := cluster.Machine{Name: "nodeB", ID: 2, State: cluster.Second, Epoch: e,
		Peer: cluster.Peer{Seen: true, Name: "nodeA", State: cluster.Prim, Epoch: e, Synced: true}}
	recv, _ = cluster.Step(recv, cluster.Event{Kind: cluster.EvPeer, Peer: h1.Peer()})
	recv, _ = cluster.Step(recv, cluster.Event{Kind: cluster.EvPeer, Peer: h2.Peer()})
	if !recv.State.Serving() {
		t.Fatalf("a heartbeat spanning the whole leave: %s synced=%v, then %s handover=%v; the receiver ends %s stale=%v: the swap is undone",
			h1.State, h1.Synced, h2.State, h2.Handover, recv.State, recv.Stale)
	}
}
