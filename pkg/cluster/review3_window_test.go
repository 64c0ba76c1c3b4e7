package cluster

import "testing"

// From a third review of the deferred publication of a handover's
// receiver (forty-fifth session).

// TestGiverLostReceiverInWindowThenHearsSecondServes: `duet swap` from
// the preferred nodeA. nodeB takes the handover (takeHandover): while its
// serve runs (VIP probe, capture load, mapped files read whole) its
// heartbeats say SECOND at the old epoch. nodeB's host stalls (or a cut
// hides its heartbeats) for cluster.timeout in that window: nodeA
// declares it lost, and the takeback rule clears HandedOver and arms the
// checks with their grace. nodeB resumes, still in its serve, and says
// SECOND at epoch e again: nodeA, no longer handed over, not stale, wins
// over a SECOND at its epoch (preferred) and serves at once, without the
// grace or the checks, while nodeB goes on adding the VIP and publishes
// PRIM. Before that change nodeB said PRIM at its new epoch in that window,
// and nodeA, hearing it, counted its copy stale.
func TestGiverLostReceiverInWindowThenHearsSecondServes(t *testing.T) {
	e := ep(5, 1)
	giver, recv := mirrored(e)
	giver, _ = Step(giver, Event{Kind: EvCmdSwap})
	if giver.State != Wait || !giver.HandedOver {
		t.Fatalf("swap: %s handed over %v", giver.State, giver.HandedOver)
	}
	served, acts := Step(recv, hb(giver, false))
	if !has(acts, DoServe) {
		t.Fatalf("receiver did not take the handover: %s", served.State)
	}
	window := said(recv, served, acts) // what nodeB says while its serve runs
	giver, _ = Step(giver, hb(window, false))
	giver, acts = Step(giver, Event{Kind: EvPeerLost}) // nodeB stalled
	if giver.State.Serving() {
		t.Fatalf("giver served on the loss itself: %v", acts)
	}
	// nodeB resumes, its serve not done yet: it says SECOND at e.
	giver, acts = Step(giver, hb(window, false))
	if giver.State.Serving() || has(acts, DoServe) {
		t.Fatalf("both serve: nodeA (%s, epoch %d) served on hearing nodeB say %s at epoch %d while nodeB's handover serve runs "+
			"(nodeB then publishes %s at epoch %d)", giver.State, giver.Epoch, window.State, window.Epoch, served.State, served.Epoch)
	}
}

// TestForcedPrimOnGiverDuringReceiverWindowRefused: `duet prim --force`
// is refused whatever the force while the peer says it serves ("never
// two primaries"). In a handover receiver's window it says SECOND, so the
// giver's forced prim is taken while the receiver adds the VIP. Before
// that change the receiver said PRIM then, and the command was refused.
func TestForcedPrimOnGiverDuringReceiverWindowRefused(t *testing.T) {
	e := ep(5, 1)
	giver, recv := mirrored(e)
	giver, _ = Step(giver, Event{Kind: EvCmdSwap})
	served, acts := Step(recv, hb(giver, false))
	giver, _ = Step(giver, hb(said(recv, served, acts), false))
	giver, acts = Step(giver, Event{Kind: EvCmdPrim, Force: true})
	if has(acts, DoServe) {
		t.Fatalf("forced prim on the giver taken while the receiver's handover serve runs: both serve (giver %s epoch %d, receiver %s epoch %d)",
			giver.State, giver.Epoch, served.State, served.Epoch)
	}
}

// TestTakebackEpochBeyondReceiversFailedTerm: the giver that takes the
// role back from a receiver whose handover serve failed (STOP at the
// giver's epoch, never served) draws an epoch beyond the receiver's
// failed term, as the takeback of a lost receiver does: should the
// receiver's undo not have been saved, its disk says PRIM at that term,
// and with the higher node ID an epoch of the same counter would be the
// newer (the review's third point).
func TestTakebackEpochBeyondReceiversFailedTerm(t *testing.T) {
	e := ep(5, 1)
	giver, recv := mirrored(e) // nodeA ID 1 gives, nodeB ID 2 receives
	giver, _ = Step(giver, Event{Kind: EvCmdSwap})
	served, acts := Step(recv, hb(giver, false))
	if !has(acts, DoServe) {
		t.Fatalf("receiver did not take the handover: %s", served.State)
	}
	giver, _ = Step(giver, hb(said(recv, served, acts), false))
	stopped, _ := Step(served, Event{Kind: EvServeFailed, Why: "adding VIP"})
	giver, acts = Step(giver, hb(stopped, false))
	if !has(acts, DoServe) {
		t.Fatalf("no takeback: %s", giver.State)
	}
	if giver.Epoch <= served.Epoch {
		t.Fatalf("the takeback's epoch %d is not beyond the receiver's failed term %d", giver.Epoch, served.Epoch)
	}
}
