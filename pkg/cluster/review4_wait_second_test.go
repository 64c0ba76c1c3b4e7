package cluster

import "testing"

// From a fourth review (forty-fifth session) of the rules that a WAIT
// node does not win over a SECOND and that the takeback from a receiver
// that never served draws two counters further.

// loaded is m as pkg/node's loadMachine makes it after a restart, from
// what m's last successful save holds (state, epoch, stale, handedOver).
func loaded(m Machine, state State, epoch uint64, stale, handedOver bool) Machine {
	r := Machine{Name: m.Name, ID: m.ID, State: Wait, Preferred: m.Preferred, Epoch: epoch, Stale: stale, HandedOver: handedOver}
	switch state {
	case Prim, Alone:
		r.Stale = false
	case Second:
		r.Stale = true
	}
	return r
}

// TestGiverLostReceiverInWindowTakebackBeyondFailedTerm: as
// TestGiverLostReceiverInWindowThenHearsSecondServes, then nodeB's
// handover serve fails (EvServeFailed: STOP at the old epoch e) and its
// undo is not saved (the case rule (3) guards: the state directory
// refuses writes, nodeB's disk says PRIM at its failed term). nodeA lost
// nodeB in the window, so it is no longer HandedOver, and the raised
// Peer.Epoch of the lost-receiver takeback is overwritten by the next
// heartbeat: hearing STOP at e it serves through the plain "stopped peer"
// path at nextEpoch(2) from e — the same counter as nodeB's failed term,
// and lower with nodeB's higher ID. Both restart (a site power loss):
// nodeB, PRIM on disk at the higher epoch, wins and its older copy is
// the reference; what nodeA acknowledged in its takeback term is replaced.
func TestGiverLostReceiverInWindowTakebackBeyondFailedTerm(t *testing.T) {
	e := ep(5, 1)
	giver, recv := mirrored(e)
	giver, _ = Step(giver, Event{Kind: EvCmdSwap})
	served, acts := Step(recv, hb(giver, false))
	if !has(acts, DoServe) {
		t.Fatalf("receiver did not take the handover: %s", served.State)
	}
	window := said(recv, served, acts)
	giver, _ = Step(giver, hb(window, false))
	giver, _ = Step(giver, Event{Kind: EvPeerLost}) // nodeB stalls in its serve
	giver, _ = Step(giver, hb(window, false))       // resumes, still SECOND (rule 1: no serve)
	if giver.State.Serving() {
		t.Fatalf("giver served beside the window")
	}
	stopped, _ := Step(served, Event{Kind: EvServeFailed, Why: "adding VIP"})
	giver, acts = Step(giver, hb(stopped, false))
	if !has(acts, DoServe) {
		t.Fatalf("no takeback on hearing the failed receiver STOP: %s", giver.State)
	}
	takeback := giver.Epoch
	if takeback <= served.Epoch {
		t.Errorf("the takeback's epoch %d (counter %d) is not beyond the receiver's failed term %d (counter %d) whose undo may be unsaved",
			takeback, takeback>>8, served.Epoch, served.Epoch>>8)
	}
	// Both restart; nodeB's disk still holds its failed term (PRIM).
	a := loaded(giver, Prim, takeback, false, false)
	b := loaded(stopped, Prim, served.Epoch, false, false)
	for i := 0; i < 3 && !a.State.Serving() && !b.State.Serving(); i++ {
		b, _ = Step(b, hb(a, false))
		a, _ = Step(a, hb(b, false))
	}
	if b.State.Serving() {
		t.Errorf("after a restart of both, nodeB serves its copy of the failed term (epoch %d) over nodeA's takeback term (epoch %d): nodeA's acknowledged writes are replaced",
			b.Epoch, takeback)
	}
}

// TestGiverLostReceiverInWindowThenWaitTakebackBeyondFailedTerm: the same
// with the operator starting nodeB again (`duet start`, WAIT at e):
// nodeA wins over it through the plain wins() path.
func TestGiverLostReceiverInWindowThenWaitTakebackBeyondFailedTerm(t *testing.T) {
	e := ep(5, 1)
	giver, recv := mirrored(e)
	giver, _ = Step(giver, Event{Kind: EvCmdSwap})
	served, acts := Step(recv, hb(giver, false))
	window := said(recv, served, acts)
	giver, _ = Step(giver, hb(window, false))
	giver, _ = Step(giver, Event{Kind: EvPeerLost})
	giver, _ = Step(giver, hb(window, false))
	stopped, _ := Step(served, Event{Kind: EvServeFailed, Why: "adding VIP"})
	started, _ := Step(stopped, Event{Kind: EvCmdStart})
	giver, acts = Step(giver, hb(started, false))
	if !has(acts, DoServe) {
		t.Fatalf("no takeback: %s", giver.State)
	}
	if giver.Epoch <= served.Epoch {
		t.Errorf("the takeback's epoch %d is not beyond the receiver's failed term %d", giver.Epoch, served.Epoch)
	}
}

// The cases below passed on the code reviewed: rule (1) delays a WAIT node's serve
// by at most the SECOND's next step on hearing it, or its loss and checks.

func TestReview4RestartedPrimaryNextToSecondServes(t *testing.T) {
	a, b := mirrored(ep(5, 1))
	a = loaded(a, Prim, a.Epoch, false, false) // nodeA's daemon crashed and restarted
	a, acts := Step(a, hb(b, false))           // hears SECOND first: waits
	if has(acts, DoServe) {
		t.Fatalf("served over a SECOND")
	}
	b, _ = Step(b, hb(a, false))
	a, acts = Step(a, hb(b, false))
	if b.State != Wait || !has(acts, DoServe) {
		t.Fatalf("nodeB %s, nodeA %s", b.State, a.State)
	}
}

func TestReview4OneWaySecondDeafResolvesByItsChecks(t *testing.T) {
	for _, ok := range []bool{false, true} {
		a, b := mirrored(ep(5, 1))
		a = loaded(a, Prim, a.Epoch, false, false)
		a, _ = Step(a, hb(b, false)) // nodeA hears nodeB; nodeB never hears nodeA
		b, _ = Step(b, Event{Kind: EvPeerLost})
		b, _ = Step(b, Event{Kind: EvChecked, OK: ok, Why: "witness"})
		a, acts := Step(a, hb(b, false))
		if !a.State.Serving() && !b.State.Serving() {
			t.Fatalf("checks ok=%v: nothing serves (nodeA %s %v, nodeB %s)", ok, a.State, acts, b.State)
		}
		if a.State.Serving() && b.State.Serving() {
			t.Fatalf("both serve")
		}
	}
}

func TestReview4SecondMidResyncTurnsWait(t *testing.T) {
	a, b := mirrored(ep(5, 1))
	a = loaded(a, Prim, a.Epoch, false, false)
	b.Resyncing = "/srv/data"
	a, _ = Step(a, hb(b, false))
	b, _ = Step(b, hb(a, false))
	a, acts := Step(a, hb(b, false))
	if b.State != Wait || !has(acts, DoServe) {
		t.Fatalf("nodeB %s stale %v, nodeA %s", b.State, b.Stale, a.State)
	}
}
