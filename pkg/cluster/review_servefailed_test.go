package cluster

import "testing"

// From a review of the first version of the undo of a failed handover
// (forty-fifth session, where every serve was published late and
// undone); each failed on it.

// TestServeFailedReceiverStartedDuringTakebackBothServe: a failback
// (nodeB, not preferred, hands the role to the preferred nodeA) whose
// receiver cannot take the role. nodeA stops at
// the giver's epoch, not stale. nodeB hears STOP and takes the role back;
// while its serve runs (VIP probe, capture load) it still publishes
// WAIT, handed over, at epoch e (that version published every serving state
// only once the VIP and capture were held; now only a handover's
// receiver does, Machine.takeHandover). The operator mends
// nodeA and runs `duet start` in that window: nodeA is WAIT at e, not
// stale, and hears nodeB's published WAIT at e: it wins (preferred) and
// serves too.
func TestServeFailedReceiverStartedDuringTakebackBothServe(t *testing.T) {
	e := ep(5, 2)
	giver := Machine{Name: "nodeB", ID: 2, State: Prim, Epoch: e, Shared: true,
		Peer: Peer{Seen: true, Name: "nodeA", State: Second, Epoch: e, Preferred: true}}
	recv := Machine{Name: "nodeA", ID: 1, State: Second, Epoch: e, Preferred: true,
		Peer: Peer{Seen: true, Name: "nodeB", State: Prim, Epoch: e, Synced: true}}

	giver, _ = Step(giver, Event{Kind: EvCmdSwap}) // failback
	if giver.State != Wait || !giver.HandedOver {
		t.Fatalf("failback: %s handed over %v", giver.State, giver.HandedOver)
	}
	recv, acts := Step(recv, hb(giver, false))
	if !has(acts, DoServe) {
		t.Fatalf("receiver did not take the handover: %s", recv.State)
	}
	recv, _ = Step(recv, Event{Kind: EvServeFailed, Why: "adding VIP: operation not permitted"})
	if recv.State != Stop || recv.Stale {
		t.Fatalf("receiver after EvServeFailed: %s stale=%v", recv.State, recv.Stale)
	}
	before := giver
	giver, acts = Step(giver, hb(recv, false))
	if !giver.State.Serving() || !has(acts, DoServe) {
		t.Fatalf("giver did not take the role back: %s", giver.State)
	}
	published := said(before, giver, acts) // what nodeB says while its takeback's serve runs
	// nodeA, still STOP, hears nodeB's published state (WAIT), then is
	// started by the operator and hears it again.
	recv, _ = Step(recv, hb(published, false))
	recv, _ = Step(recv, Event{Kind: EvCmdStart})
	recv, acts = Step(recv, hb(published, false))
	if recv.State.Serving() || has(acts, DoServe) {
		t.Fatalf("both serve: nodeB took the role back (%s, epoch %d) and nodeA, started while nodeB's serve ran, serves too (%s, epoch %d)",
			giver.State, giver.Epoch, recv.State, recv.Epoch)
	}
}

// TestFailedTakebackKeepsHandedOver: a giver whose "never served"
// takeback fails was restored HandedOver. If its receiver
// (STOP at the same epoch, never served) is then lost while the giver is
// stopped, `duet start` on the giver left it WAIT, handed over, with
// no peer: no checks, plain `duet prim` refused. Before that version, and
// now (a takeback is no handover: not undone), it stops at its new
// epoch, not handed over, and serves after a start.
func TestFailedTakebackKeepsHandedOver(t *testing.T) {
	e := ep(5, 1)
	giver, recv := mirrored(e)
	giver, _ = Step(giver, Event{Kind: EvCmdSwap})
	recv, _ = Step(recv, hb(giver, false))
	recv, _ = Step(recv, Event{Kind: EvServeFailed, Why: "adding VIP"})
	giver, acts := Step(giver, hb(recv, false))
	if !has(acts, DoServe) {
		t.Fatalf("no takeback: %s", giver.State)
	}
	giver, _ = Step(giver, Event{Kind: EvServeFailed, Why: "starting capture"})
	giver, _ = Step(giver, Event{Kind: EvPeerLost}) // the receiver's host dies
	giver, _ = Step(giver, Event{Kind: EvCmdStart}) // the operator mends the giver
	for i := 0; i < 5; i++ {
		var acts []Action
		giver, acts = Step(giver, Event{Kind: EvTick})
		if has(acts, DoCheck) {
			giver, _ = Step(giver, Event{Kind: EvChecked, OK: true})
		}
		if giver.State.Serving() {
			return
		}
	}
	_, pa := Step(giver, Event{Kind: EvCmdPrim})
	t.Fatalf("giver, whose copy is the reference (the receiver never served), is %s handedOver=%v stale=%v after `duet start`: nothing serves; plain `duet prim` refused=%v",
		giver.State, giver.HandedOver, giver.Stale, has(pa, DoRefuse))
}
