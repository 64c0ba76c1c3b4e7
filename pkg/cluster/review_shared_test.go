package cluster

import "testing"

// Tests from a review of 488afdf (Machine.Shared, Machine.StaleHeld);
// each failed on that commit.

// exchange runs n rounds of heartbeats, a's first (b hears a), then b's.
func exchange(a, b Machine, n int) (Machine, Machine) {
	for i := 0; i < n; i++ {
		b, _ = Step(b, hb(a, false))
		a, _ = Step(a, hb(b, false))
	}
	return a, b
}

// TestHeldStaleNewerLosesToRestartedOlderPeer: as
// TestResumedPrimaryFoundHoldingTheVIP, but nodeA's daemon restarts
// (a watchdog after the stall, `systemctl restart`) before it applied
// nodeB's heartbeat: it comes back WAIT, not stale (cluster.json says
// ALONE), no longer Shared. nodeB's copy, newer, is stale only by the
// held role (StaleHeld), which wins() counts as stale: nodeA wins,
// serves, and resynchronises nodeB: the writes nodeB acknowledged in its
// takeover's term are replaced. Without the held check (nodeB plain
// not stale) nodeB wins on its newer epoch.
func TestHeldStaleNewerLosesToRestartedOlderPeer(t *testing.T) {
	a, b := mirrored(ep(5, 1))
	b, _ = Step(b, Event{Kind: EvPeerLost})
	b, _ = Step(b, Event{Kind: EvChecked, OK: true})
	bTerm := b.Epoch
	b = Machine{Name: "nodeB", ID: 2, State: Wait, Epoch: bTerm} // restarted
	a, _ = Step(a, Event{Kind: EvPeerLost})                      // resumed
	b, _ = Step(b, Event{Kind: EvTick})
	b, _ = Step(b, Event{Kind: EvChecked, Why: "VIP answered", Held: true})
	if !b.StaleHeld {
		t.Fatalf("scenario void: nodeB stale %v held %v", b.Stale, b.StaleHeld)
	}
	// nodeA's daemon restarts before it heard nodeB (loadMachine of ALONE).
	a = Machine{Name: "nodeA", ID: 1, State: Wait, Epoch: a.Epoch, Preferred: true}
	aTerm := a.Epoch
	a, b = exchange(a, b, 5)
	if a.State.Serving() && b.Stale {
		t.Fatalf("nodeA (%s, from its older copy at epoch %d; now %d) serves and nodeB (%s, stale %v, epoch %d: its takeover's term, writes acknowledged) is resynchronised by it",
			a.State, aTerm, a.Epoch, b.State, b.Stale, bTerm)
	}
}

// TestStoppedNewerPeerResyncedByResumedPrimary: the fix covers a newer
// peer met WAIT, not one met STOP. nodeA's host stalls; nodeB takes over
// and acknowledges writes; the operator runs `duet stop` on nodeB (no
// peer in sync: nothing serves); nodeA resumes, Shared. nodeA hears
// nodeB STOP, not stale, newer, stays the reference (ALONE -> PRIM,
// "resynchronising it"); nodeB, stopped, hears a serving peer and counts
// its copy stale, its replica server admits nodeA's stream: nodeB's
// acknowledged writes are replaced. A WAIT node that hears the same
// STOP peer counts its own copy stale (stepWait: "unless the stopped one
// is newer").
func TestStoppedNewerPeerResyncedByResumedPrimary(t *testing.T) {
	a, b := mirrored(ep(5, 1))
	b, _ = Step(b, Event{Kind: EvPeerLost})
	b, _ = Step(b, Event{Kind: EvChecked, OK: true})
	bTerm := b.Epoch
	b, _ = Step(b, Event{Kind: EvCmdStop})
	if b.State != Stop || b.Stale {
		t.Fatalf("scenario void: nodeB %s stale %v", b.State, b.Stale)
	}
	a, _ = Step(a, Event{Kind: EvPeerLost})
	if !a.Shared || a.Epoch >= bTerm {
		t.Fatalf("scenario void: nodeA shared %v epoch %d", a.Shared, a.Epoch)
	}
	// In either order.
	a2, _ := Step(a, hb(b, false))
	b2, _ := Step(b, hb(a, false))
	if a2.State.Serving() && b2.Stale {
		t.Fatalf("nodeA (%s, epoch %d, Shared) stays the reference over nodeB (STOP, stale %v now, epoch %d, its takeover's term): nodeB's acknowledged writes are resynchronised away",
			a2.State, a2.Epoch, b2.Stale, bTerm)
	}
}

// TestYieldingCopyStoppedTurnsStale: nodeB (WAIT, not stale, newer)
// yields to a Shared older primary (YieldsTo) and waits for its step
// down; the daemon is stopped meanwhile (systemctl stop applies
// EvCmdStop): EvCmdStop counts the copy stale because the peer serves,
// ignoring YieldsTo. nodeA then hears nodeB STOP and stale, stays the
// reference and resynchronises it.
func TestYieldingCopyStoppedTurnsStale(t *testing.T) {
	a, b := mirrored(ep(5, 1))
	b, _ = Step(b, Event{Kind: EvPeerLost})
	b, _ = Step(b, Event{Kind: EvChecked, OK: true})
	// nodeB leaves its takeover's term without a restart (isolated).
	b, _ = Step(b, Event{Kind: EvIsolated})
	a, _ = Step(a, Event{Kind: EvPeerLost})
	b, _ = Step(b, hb(a, false))
	if b.Stale {
		t.Fatalf("scenario void: nodeB did not yield")
	}
	b, _ = Step(b, Event{Kind: EvCmdStop})
	a, _ = Step(a, hb(b, false))
	if a.State.Serving() && b.Stale {
		t.Fatalf("nodeB stopped while yielding: stale %v; nodeA %s stays the reference (epoch %d < %d)", b.Stale, a.State, a.Epoch, b.Epoch)
	}
}

// TestMixedVersionsStepDownDeadlock: nodeA runs this version, nodeB the
// one before (it ignores Shared and StaleHeld: it never yields; nor does
// it say Yields, on which nodeA now steps down only). nodeB
// left its takeover's term without a restart (isolated), so its run
// hears nodeA at once. nodeA hears nodeB WAIT, newer, not stale and
// steps down; while it unserves its heartbeats still say ALONE, and
// nodeB, old, counts its copy stale on them. Both WAIT and stale:
// nothing serves until an operator forces one. Before the change nodeA
// stayed serving.
func TestMixedVersionsStepDownDeadlock(t *testing.T) {
	old := func(e Event) Event {
		e.Peer.Shared, e.Peer.StaleHeld, e.Peer.ServiceFailed, e.Peer.Yields = false, false, false, false
		return e
	}
	a, b := mirrored(ep(5, 1))
	b, _ = Step(b, Event{Kind: EvPeerLost})
	b, _ = Step(b, Event{Kind: EvChecked, OK: true})
	b, _ = Step(b, Event{Kind: EvIsolated})
	if b.State != Wait || b.Stale {
		t.Fatalf("scenario void: nodeB %s stale %v", b.State, b.Stale)
	}
	a, _ = Step(a, Event{Kind: EvPeerLost})
	// nodeB's heartbeats carry none of this version's flags (Yields
	// among them), and nodeB reads none of nodeA's.
	serving := a // what nodeA's heartbeats say until its step down is done
	a, _ = Step(a, old(hb(b, false)))
	b, _ = Step(b, old(hb(serving, false)))
	for i := 0; i < 5; i++ {
		b, _ = Step(b, old(hb(a, false)))
		a, _ = Step(a, old(hb(b, false)))
	}
	if !a.State.Serving() && !b.State.Serving() {
		t.Fatalf("nothing serves: nodeA %s stale %v epoch %d, nodeB %s stale %v epoch %d", a.State, a.Stale, a.Epoch, b.State, b.Stale, b.Epoch)
	}
}
