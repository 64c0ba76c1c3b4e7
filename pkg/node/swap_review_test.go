package node

import (
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/duet-ha/duet/pkg/cluster"
)

// From a review of the swap and handover paths (forty-first session):
// each test failed on cd02e3f. (The review's TestPrecheckReusedAfterGiverTookVIP,
// a receiver's precheck reused after the giver added the VIP, is not kept:
// the giver's takeback now probes a cluster.timeout after its peer's loss,
// and the receiver's takeover comes at its own loss of the giver, before;
// cluster.TestSwapCutBothTakeOver.)

// TestLeaveEndHeartbeatUndoesSwap: the loop publishes the handover
// (machine.Store of WAIT+HandedOver), then clears leaving
// (cluster.go, apply: n.machine.Store(&published); n.leaving.Store(false)).
// heartbeat() reads the machine first and leaving later (between them:
// markMu, servingPrimaries, relMu). A heartbeat that read the machine
// before the publish (PRIM) and leaving after the clear takes the
// not-leaving branch with no primaries (stopPrimary ran): PRIM, synced
// false. The receiver, SECOND, hears "PRIM, not synced", goes WAIT and
// stale, and ignores the WAIT+Handover that follows (stepWait has no
// handover case); the giver, hearing it WAIT stale, serves again. The
// swap is undone after `duet swap` answered "ok". markMu stands in for
// the preemption here.
func TestLeaveEndHeartbeatUndoesSwap(t *testing.T) {
	const e = 5<<8 | 1
	n, prim := primaryNodeA(t, e)
	published, _ := cluster.Step(prim, cluster.Event{Kind: cluster.EvCmdSwap})
	// During unserve: PRIM published, leaving, last said synced, the mark
	// of the term kept (markSaved keeps it for HandedOver); the saved
	// state is WAIT (savedPrim 0).
	n.machine.Store(&prim)
	n.leaving.Store(true)
	n.lastSynced.Store(true)
	n.markOn, n.markEpoch, n.savedPrim = true, e, 0

	n.markMu.Lock()
	got := make(chan cluster.Heartbeat)
	go func() { got <- n.heartbeat() }()
	time.Sleep(100 * time.Millisecond) // it has read the machine (PRIM) and waits for markMu
	n.machine.Store(&published)
	n.leaving.Store(false)
	n.markMu.Unlock()
	h1 := <-got
	h2 := n.heartbeat()

	recv := cluster.Machine{Name: "nodeB", ID: 2, State: cluster.Second, Epoch: e,
		Peer: cluster.Peer{Seen: true, Name: "nodeA", State: cluster.Prim, Epoch: e, Synced: true}}
	recv, _ = cluster.Step(recv, cluster.Event{Kind: cluster.EvPeer, Peer: h1.Peer()})
	recv, _ = cluster.Step(recv, cluster.Event{Kind: cluster.EvPeer, Peer: h2.Peer()})
	giver, _ := cluster.Step(published, cluster.Event{Kind: cluster.EvPeer,
		Peer: cluster.Peer{Seen: true, Name: "nodeB", State: recv.State, Epoch: recv.Epoch, Stale: recv.Stale}})
	if !recv.State.Serving() {
		t.Fatalf("heartbeats after the leave: %s synced=%v, then %s handover=%v; the receiver ends %s stale=%v and the giver %s: the swap is undone",
			h1.State, h1.Synced, h2.State, h2.Handover, recv.State, recv.Stale, giver.State)
	}
}

// TestLeaveStartHeartbeatStaysSynced: the other end of a leave. A
// heartbeat that read leaving before beginLeaving set it, and the term's
// primaries after the leave stopped them, said "PRIM, not synced": the
// receiver went stale before the handover. leaving is read again under
// relMu, after the primaries.
func TestLeaveStartHeartbeatStaysSynced(t *testing.T) {
	const e = 5<<8 | 1
	n, prim := primaryNodeA(t, e)
	n.machine.Store(&prim)
	n.lastSynced.Store(true)
	n.markOn, n.markEpoch, n.savedPrim = true, e, 0
	n.markMu.Lock()
	got := make(chan cluster.Heartbeat)
	go func() { got <- n.heartbeat() }()
	time.Sleep(100 * time.Millisecond) // it read leaving (not yet) and the machine, and waits for markMu
	n.beginLeaving(false)              // then the leave stops the primaries (none here)
	n.markMu.Unlock()
	if h := <-got; h.State == cluster.Prim && !h.Synced {
		t.Fatalf("a heartbeat at the start of a leave said PRIM, not synced: the receiver goes stale and refuses the handover")
	}
}

// TestSwapReceiverCannotSaveNothingServes: the receiver's state_dir takes
// no writes (full, read-only). On the handover its step to PRIM cannot be
// saved: carryOut keeps it from serving (rightly: it must not serve an
// epoch its disk does not hold). It used to stay SECOND and try again at
// each heartbeat, while the giver, WAIT and handed over, heard a SECOND at
// its own epoch, which no rule of stepWait ends the handover for: the
// healthy giver, whose copy is the reference, never served again, and
// nothing served until the receiver's disk was repaired or an operator
// forced the giver. Now the receiver refuses the handover (stale, WAIT)
// and the giver serves again.
// Both names: the giver wins by name (nodeA) and loses by it (nodeB).
func TestSwapReceiverCannotSaveNothingServes(t *testing.T) {
	for _, tc := range []struct {
		how          string
		giver, recvr string
	}{{"state_dir removed", "nodeA", "nodeB"}, {"state_dir read-only", "nodeA", "nodeB"}, {"state_dir read-only", "nodeB", "nodeA"}} {
		t.Run(tc.how+", giver "+tc.giver, func(t *testing.T) {
			testSwapReceiverCannotSave(t, tc.how == "state_dir removed", tc.giver, tc.recvr)
		})
	}
}

func testSwapReceiverCannotSave(t *testing.T, removed bool, giverName, recvName string) {
	const e = 5<<8 | 1
	recv := cluster.Machine{Name: recvName, ID: 2, State: cluster.Second, Epoch: e,
		Peer: cluster.Peer{Seen: true, Name: giverName, State: cluster.Prim, Epoch: e, Synced: true}}
	var r *Node
	if removed {
		r = testNode(t, filepath.Join(t.TempDir(), "missing"))
	} else {
		// Its saved state (SECOND), then neither a new save nor a
		// stale mark can be written.
		r, _ = stateDirWritesFail(t, recv)
	}
	r.cfg.Node = recvName
	if r.guard == nil {
		var err error
		if r.guard, err = newGuard(r.cfg); err != nil {
			t.Fatal(err)
		}
	}
	giver := cluster.Machine{Name: giverName, ID: 1, State: cluster.Prim, Epoch: e,
		Peer: cluster.Peer{Seen: true, Name: recvName, State: cluster.Second, Epoch: e}}
	giver, _ = cluster.Step(giver, cluster.Event{Kind: cluster.EvCmdSwap})
	var refused error
	for i := 0; i < 50; i++ {
		next, acts := cluster.Step(recv, cluster.Event{Kind: cluster.EvPeer,
			Peer: cluster.Peer{Seen: true, Name: giverName, State: giver.State, Epoch: giver.Epoch, Handover: giver.HandedOver, Boot: 1, Seq: uint64(i + 1)}})
		var did []cluster.Do
		var err error
		recv, err = r.carryOut(recv, next, acts, record(&did))
		if err != nil && refused == nil {
			refused = err
		}
		if recv.State.Serving() {
			t.Fatalf("heartbeat %d: the receiver serves (%s, epoch %d) though its state could not be saved", i, recv.State, recv.Epoch)
		}
		// What its heartbeats say (they hide a stale copy a restart
		// would not find stale).
		r.machine.Store(&recv)
		said := r.heartbeat()
		giver, _ = cluster.Step(giver, cluster.Event{Kind: cluster.EvPeer,
			Peer: cluster.Peer{Seen: true, Name: recvName, State: said.State, Epoch: said.Epoch, Stale: said.Stale}})
		giver, _ = cluster.Step(giver, cluster.Event{Kind: cluster.EvTick})
	}
	if !giver.State.Serving() {
		t.Fatalf("after 50 heartbeats: receiver %s stale %v (cannot save PRIM), giver %s handed over %v: nothing serves, both alive and hearing each other",
			recv.State, recv.Stale, giver.State, giver.HandedOver)
	}
	if giver.Epoch <= e {
		t.Fatalf("the giver serves again at epoch %d, not newer than the handover's %d", giver.Epoch, e)
	}
	if recv.State != cluster.Wait || !recv.Stale {
		t.Fatalf("the receiver is %s, stale %v: want WAIT and stale (the giver served again without it)", recv.State, recv.Stale)
	}
	if refused == nil || !strings.Contains(refused.Error(), "refusing the handover") {
		t.Fatalf("the receiver's failed step said %v, want it to name the refused handover", refused)
	}
}

// primaryNodeA returns a test node named nodeA with a heartbeat guard,
// and the machine of nodeA PRIM at epoch e with nodeB SECOND, for the
// heartbeat tests around a leave.
func primaryNodeA(t *testing.T, e uint64) (*Node, cluster.Machine) {
	t.Helper()
	n := testNode(t, t.TempDir())
	n.cfg.Node = "nodeA"
	var err error
	if n.guard, err = newGuard(n.cfg); err != nil {
		t.Fatal(err)
	}
	return n, cluster.Machine{Name: "nodeA", ID: 1, State: cluster.Prim, Epoch: e,
		Peer: cluster.Peer{Seen: true, Name: "nodeB", State: cluster.Second, Epoch: e}}
}
