package cluster

import "testing"

// Tests from a review of 2e16799 (Machine.ServiceFailed) and e57e5f1;
// each failed on e57e5f1.

// servicePair: nodeA's service failed and it handed the role to nodeB
// (nodeA SECOND, marked ServiceFailed); nodeB's service then failed too
// and it kept the role ("keeping the role"). Returns both after the
// heartbeats settled.
func servicePair(t *testing.T) (a, b Machine) {
	t.Helper()
	a, b = mirrored(ep(5, 1))
	a, _ = Step(a, Event{Kind: EvServiceDown, Why: "mariadb: port 3306 in use"})
	settle := func() {
		for k := 0; k < 4; k++ {
			b, _ = Step(b, hb(a, a.State == Prim))
			a, _ = Step(a, hb(b, b.State == Prim))
		}
	}
	settle()
	if !a.ServiceFailed || a.State != Second || b.State != Prim {
		t.Fatalf("scenario void: nodeA %s failed %v, nodeB %s", a.State, a.ServiceFailed, b.State)
	}
	var acts []Action
	b, acts = Step(b, Event{Kind: EvServiceDown, Why: "mariadb: out of memory"})
	if has(acts, DoUnserve) {
		t.Fatalf("scenario void: nodeB handed the role back")
	}
	settle()
	return a, b
}

// TestServiceKeptDeadNotRetriedWhenPeerCleared: nodeB kept the role
// with its service dead because nodeA's heartbeats said ServiceFailed.
// nodeA's daemon restarts (the mark is "not saved: a restart starts
// afresh"; or the operator mended nodeA and restarted duet there): nodeA
// comes back SECOND in sync, no longer marked. The stack reports a
// failure once per Start (stack.Failed), so no second EvServiceDown
// comes: nodeB holds the VIP with its service dead for ever, though a
// healthy, eligible peer is in sync. Nothing remembers that the service
// is down here.
func TestServiceKeptDeadNotRetriedWhenPeerCleared(t *testing.T) {
	a, b := servicePair(t)
	// nodeA's daemon restarts: loadMachine of SECOND (stale, WAIT),
	// ServiceFailed not saved.
	a = Machine{Name: "nodeA", ID: 1, State: Wait, Epoch: a.Epoch, Stale: true, Preferred: true}
	var moved bool
	for k := 0; k < 10; k++ {
		var acts []Action
		b, acts = Step(b, hb(a, false))
		moved = moved || has(acts, DoUnserve)
		a, _ = Step(a, hb(b, b.State == Prim))
		b, acts = Step(b, Event{Kind: EvTick})
		moved = moved || has(acts, DoUnserve)
	}
	if !moved && b.State.Serving() {
		t.Fatalf("nodeB (%s) keeps the role with its service dead (no restarts left, reported once), while nodeA is SECOND in sync and no longer marked ServiceFailed: nothing serves, for ever, until an operator acts", b.State)
	}
	// Fixed: nodeB handed the role to nodeA once it was in sync.
	if a.State != Prim || !b.ServiceFailed || b.State.Serving() {
		t.Fatalf("after the move: nodeA %s, nodeB %s (service failed %v)", a.State, b.State, b.ServiceFailed)
	}
}

// TestServiceFailedSurvivesStopStart: the operator mends the service on
// nodeA and runs `duet stop` then `duet start` there (the usual way to
// take a node out and back in). A daemon restart clears the mark ("not
// saved: a restart starts afresh"); stop and start do not: nodeA comes
// back SECOND still marked, and nodeB's next service failure keeps the
// role with the service dead, though nodeA was mended.
func TestServiceFailedSurvivesStopStart(t *testing.T) {
	a, b := servicePair(t)
	a, _ = Step(a, Event{Kind: EvCmdStop})
	b, _ = Step(b, hb(a, false))
	a, _ = Step(a, Event{Kind: EvCmdStart})
	for k := 0; k < 4; k++ {
		b, _ = Step(b, hb(a, false))
		a, _ = Step(a, hb(b, b.State == Prim))
	}
	if a.ServiceFailed {
		t.Fatalf("nodeA, stopped and started by the operator (after mending its service), is still marked ServiceFailed: a failed service on nodeB keeps the role dead there")
	}
	// Fixed: and nodeB, whose service is down, handed the role to it.
	if a.State != Prim || b.State.Serving() {
		t.Fatalf("after the start: nodeA %s, nodeB %s", a.State, b.State)
	}
}
