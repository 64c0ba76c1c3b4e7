package cluster

import "testing"

// From a second review (forty-first session) of d0aac90.

// TestSwapCutFlapLosesGrace: the grace of a takeback is tied to the
// handover (step: HandedOver && Peer.Seen && EvPeerLost), which the first
// loss clears. A swap, then a cut; the giver loses the receiver and its
// graced check waits. One heartbeat of the receiver (still SECOND at the
// giver's epoch: it never heard the handover) reaches the giver (a flap,
// a one-way link); the receiver is preferred, so the giver, WAIT and no
// longer handed over, does not serve and stays WAIT (Checking cleared).
// Silence again: the giver's next loss is an ordinary WAIT's, whose check
// has no Grace, while the receiver, a SECOND that has heard nothing since
// the cut, takes over at about the same moment. Both probe a VIP nobody
// holds: the race Grace was added for (TestSwapCutBothTakeOver) is back
// after one stray heartbeat. (The first, graced, check is still in
// flight too: two checks at once.)
func TestSwapCutFlapLosesGrace(t *testing.T) {
	e := ep(5, 1)
	giver := Machine{Name: "nodeA", ID: 1, State: Prim, Epoch: e,
		Peer: Peer{Seen: true, Name: "nodeB", State: Second, Epoch: e, Preferred: true}}
	recv := Machine{Name: "nodeB", ID: 2, State: Second, Epoch: e, Preferred: true,
		Peer: Peer{Seen: true, Name: "nodeA", State: Prim, Epoch: e, Synced: true}}
	giver, _ = Step(giver, Event{Kind: EvCmdSwap})
	giver, ga1 := Step(giver, Event{Kind: EvPeerLost})
	if c, g := checkGraced(ga1); !c || !g {
		t.Fatalf("first loss: check %v grace %v", c, g)
	}
	// One heartbeat of the receiver reaches the giver.
	giver, fa := Step(giver, peerEv(Peer{Name: "nodeB", State: recv.State, Epoch: recv.Epoch, Preferred: true}))
	if giver.State.Serving() || has(fa, DoServe) {
		t.Skipf("the giver served on the flap (%s): no race", giver.State)
	}
	// Silence again: both lose each other.
	giver, ga2 := Step(giver, Event{Kind: EvPeerLost})
	recv, ra := Step(recv, Event{Kind: EvPeerLost})
	gc, gg := checkGraced(ga2)
	rc, rg := checkGraced(ra)
	if gc && !gg && rc && !rg && !recv.Stale {
		t.Fatalf("after a swap, a cut and one stray heartbeat of the receiver (SECOND, epoch %d, never served): the giver (%s, handed over %v, checking %v) "+
			"checks again without Grace while the receiver checks too (its takeover): both probe a free VIP at once; "+
			"the giver's first graced check is still in flight", recv.Epoch, giver.State, giver.HandedOver, giver.Checking)
	}
}
