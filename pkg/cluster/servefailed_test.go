package cluster

import "testing"

// TestHandoverReceiverServeFailedGiverServes: a handover (here `duet
// swap`; failback and a failed service take the same path) whose receiver
// cannot take the role (node.serve fails: the VIP cannot be added, the
// capture cannot attach). Before, the receiver stopped at the epoch it had
// drawn for the term, and its heartbeats had said PRIM while serve ran:
// the giver, whose copy was whole and which was serving a moment before,
// counted its copy stale and never served again; plain `duet prim` on it
// was refused. Nothing served until an operator acted, though the failed
// term started no service and acknowledged nothing. Now the daemon says
// PRIM only once the role is taken, and a failed serve stops at the epoch
// the copy had: the giver takes the role back.
func TestHandoverReceiverServeFailedGiverServes(t *testing.T) {
	e := ep(5, 1)
	giver, recv := mirrored(e)

	giver, _ = Step(giver, Event{Kind: EvCmdSwap})
	if giver.State != Wait || !giver.HandedOver {
		t.Fatalf("swap: %s handed over %v", giver.State, giver.HandedOver)
	}
	before := recv
	var acts []Action
	recv, acts = Step(recv, hb(giver, false))
	if !has(acts, DoServe) {
		t.Fatalf("receiver did not take the handover: %s", recv.State)
	}
	// While serve runs the daemon still says what it said before.
	giver, _ = Step(giver, hb(before, false))
	recv, acts = Step(recv, Event{Kind: EvServeFailed, Why: "adding VIP: operation not permitted"})
	if recv.State != Stop || !has(acts, DoUnserve) || !has(acts, DoPersist) {
		t.Fatalf("receiver after EvServeFailed: %s, actions %v", recv.State, acts)
	}
	if recv.Epoch != e || recv.Stale {
		t.Fatalf("receiver stopped at epoch %d stale=%v, want its copy's epoch %d, not stale: the failed term began nothing", recv.Epoch, recv.Stale, e)
	}
	giver, acts = Step(giver, hb(recv, false))
	if !giver.State.Serving() || !has(acts, DoServe) {
		t.Fatalf("the giver, hearing the receiver STOP at epoch %d, is %s stale=%v handedOver=%v: nothing serves", recv.Epoch, giver.State, giver.Stale, giver.HandedOver)
	}
	if giver.Epoch <= e {
		t.Fatalf("the giver took the role back at epoch %d, not newer than %d", giver.Epoch, e)
	}
	// The stopped receiver hears it serve: its copy is stale from now on,
	// and started again it follows.
	recv, _ = Step(recv, hb(giver, false))
	if !recv.Stale {
		t.Fatalf("the stopped receiver, hearing the giver serve at epoch %d, does not count its copy stale", giver.Epoch)
	}
	recv, _ = Step(recv, Event{Kind: EvCmdStart})
	recv, _ = Step(recv, hb(giver, true))
	if recv.State != Second || recv.Epoch != giver.Epoch {
		t.Fatalf("started again, the receiver is %s at epoch %d, want SECOND at %d", recv.State, recv.Epoch, giver.Epoch)
	}
}

// said is what a node that stepped from before to after (with acts)
// publishes while the serve runs: the state before for a DoServe that is
// Unpublished (a handover's receiver), the new one otherwise.
func said(before, after Machine, acts []Action) Machine {
	for _, a := range acts {
		if a.Do == DoServe && a.Unpublished {
			return before
		}
	}
	return after
}

// TestServeFailedUndoesOnlyAHandover: only a handover's failed serve is
// undone, and only in the step right after it (a machine that stepped on
// since has served, and stops where it is); it keeps the copy's mark of
// a failed service. Every other serve is published at once and, failed,
// stops at its new epoch.
func TestServeFailedUndoesOnlyAHandover(t *testing.T) {
	e := ep(5, 1)
	giver, recv := mirrored(e)
	recv.ServiceFailed = true // it gave the role up for a failed service; `duet swap` hands it back
	giver, _ = Step(giver, Event{Kind: EvCmdSwap})
	served, acts := Step(recv, hb(giver, false))
	if !has(acts, DoServe) || said(recv, served, acts).State != Second {
		t.Fatalf("handover: %s, published %s", served.State, said(recv, served, acts).State)
	}
	m, _ := Step(served, Event{Kind: EvServeFailed, Why: "adding VIP"})
	if m.State != Stop || m.Epoch != e || !m.ServiceFailed {
		t.Fatalf("after the failed handover: %s epoch %d serviceFailed=%v, want STOP at %d, service failed", m.State, m.Epoch, m.ServiceFailed, e)
	}
	m, _ = Step(served, Event{Kind: EvTick})
	m, _ = Step(m, Event{Kind: EvServeFailed, Why: "late"})
	if m.State != Stop || m.Epoch != served.Epoch {
		t.Fatalf("a failure after another step: %s epoch %d, want STOP at the term's epoch %d", m.State, m.Epoch, served.Epoch)
	}

	f := Machine{Name: "nodeB", ID: 2, State: Wait, Epoch: e, Stale: true}
	f, acts = Step(f, Event{Kind: EvCmdPrim, Force: true})
	if !has(acts, DoServe) || said(Machine{}, f, acts).State != f.State {
		t.Fatalf("forced prim: %s, not published at once", f.State)
	}
	term := f.Epoch
	f, _ = Step(f, Event{Kind: EvServeFailed, Why: "starting capture"})
	if f.State != Stop || f.Epoch != term || f.Stale {
		t.Fatalf("a failed forced prim: %s epoch %d stale=%v, want STOP at its term's epoch %d", f.State, f.Epoch, f.Stale, term)
	}
}
