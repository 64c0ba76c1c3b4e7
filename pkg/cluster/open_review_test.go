package cluster

import "testing"

// From a review of split brain, disk/service failure and failback paths
// (forty-second session). Each of these failed on the code of that day.

// mirrored returns nodeA, PRIM and preferred, and nodeB, its SECOND in
// sync, both at epoch e and hearing each other (so nodeA's term is
// Shared).
func mirrored(e uint64) (a, b Machine) {
	return Machine{Name: "nodeA", ID: 1, State: Prim, Epoch: e, Preferred: true, Shared: true,
			Peer: Peer{Seen: true, Name: "nodeB", State: Second, Epoch: e}},
		Machine{Name: "nodeB", ID: 2, State: Second, Epoch: e,
			Peer: Peer{Seen: true, Name: "nodeA", State: Prim, Epoch: e, Synced: true, Preferred: true}}
}

// hb is the heartbeat m sends, as its peer applies it.
func hb(m Machine, synced bool) Event {
	return peerEv(Peer{Name: m.Name, State: m.State, Epoch: m.Epoch, Stale: m.Stale,
		Preferred: m.Preferred, Handover: m.HandedOver, Synced: synced, Shared: m.Shared, StaleHeld: m.StaleHeld, ServiceFailed: m.ServiceFailed, Yields: true})
}

// TestResumedPrimaryServesOverNewerPeer: a serving node that heard a
// peer which is not serving but holds a newer, not stale epoch carried
// on as the reference (stepServing's EvPeer compared epochs only with a
// serving peer), although the peer's newer epoch came from a takeover
// after this node's term began (a review, forty-second session; fixed
// by Machine.Shared):
//
//  1. nodeA PRIM, nodeB SECOND, same epoch.
//  2. nodeA's host stalls (VM paused, hung hypervisor) past the timeout:
//     no heartbeats, no ARP answers. No fence configured (the VIP probe
//     suffices for the validator).
//  3. nodeB: peer lost, checks pass (VIP unanswered, witness answers):
//     ALONE with a newer epoch; it acknowledges writes alone.
//  4. nodeB's daemon is restarted (SIGTERM: an upgrade, `systemctl
//     restart`; the SIGTERM path leaves the role without a state step, so
//     cluster.json still says ALONE): it comes back WAIT, not stale, at
//     its newer epoch (and waits for nodeA: cluster.start_wait).
//  5. nodeA resumes: its loop declares the peer lost (PRIM -> ALONE,
//     nextEpoch(1) from the old epoch, older than nodeB's), still holding
//     the VIP and running its services; or it hears nodeB's new
//     heartbeats first, still PRIM at the old epoch.
//  6. They hear each other, in either order. Before: nodeB (WAIT) heard
//     a serving peer and marked its newer copy stale; nodeA heard nodeB
//     WAIT with the newer epoch and went ALONE -> PRIM, "resynchronising
//     it": nodeB's writes acknowledged in step 3 were replaced by nodeA's
//     older copy. Had nodeB still been serving at step 6, nodeA would have
//     stepped down (the newer epoch wins); that the newer side's daemon
//     was restarted in between decided which side's acknowledged writes
//     survived. Now nodeA steps down and nodeB serves its copy.
func TestResumedPrimaryServesOverNewerPeer(t *testing.T) {
	for _, order := range []string{"nodeB hears first", "nodeA hears first", "nodeA hears nodeB before it notices the loss"} {
		bFirst := order == "nodeB hears first"
		t.Run(order, func(t *testing.T) {
			e := ep(5, 1)
			a, b := mirrored(e)

			// 3. nodeB takes over.
			b, _ = Step(b, Event{Kind: EvPeerLost})
			b, acts := Step(b, Event{Kind: EvChecked, OK: true})
			if b.State != Alone || !has(acts, DoServe) {
				t.Fatalf("nodeB did not take over: %s", b.State)
			}
			bTerm := b.Epoch
			// 4. nodeB's daemon restarted: loadMachine of a saved ALONE.
			b = Machine{Name: "nodeB", ID: 2, State: Wait, Epoch: b.Epoch, Stale: false}
			// 5. nodeA resumes: its loop declares the peer lost, or
			// first hears nodeB's new heartbeats (still PRIM).
			if order != "nodeA hears nodeB before it notices the loss" {
				a, _ = Step(a, Event{Kind: EvPeerLost})
				if a.State != Alone {
					t.Fatalf("nodeA after resume: %s", a.State)
				}
			}
			if a.Epoch >= bTerm {
				t.Fatalf("nodeA's epoch %d not older than nodeB's %d: scenario void", a.Epoch, bTerm)
			}
			aTerm := a.Epoch
			// 6. They meet.
			var aActs []Action
			for i := 0; i < 5; i++ {
				var acts []Action
				if bFirst {
					b, _ = Step(b, hb(a, false))
					a, acts = Step(a, hb(b, false))
				} else {
					a, acts = Step(a, hb(b, false))
					b, _ = Step(b, hb(a, false))
				}
				aActs = append(aActs, acts...)
			}
			if a.State.Serving() || b.Stale {
				t.Fatalf("nodeA (%s, epoch %d: the term it had before its host stalled) stays the reference over nodeB (%s, stale %v, epoch %d: "+
					"the term it served alone, acknowledging writes, while nodeA was stalled): nodeB's acknowledged writes are replaced by the resync",
					a.State, aTerm, b.State, b.Stale, bTerm)
			}
			if !has(aActs, DoUnserve) || !a.Stale {
				t.Fatalf("nodeA left the role without unserving or stale %v", a.Stale)
			}
			if !b.State.Serving() || b.Epoch <= bTerm {
				t.Fatalf("nodeB, whose copy is the newest, does not serve: %s epoch %d", b.State, b.Epoch)
			}
		})
	}
}

// TestTakeoverTermStaysOverOlderTakeover is the other side of
// TestResumedPrimaryServesOverNewerPeer: a node that served in a term of
// its own takeover (here after its start wait passed without hearing the
// peer, which had served alone after it and then died) stays the
// reference when the peer comes back WAIT with an epoch that compares
// newer (drawn from the same base, with the larger node ID) but is the
// older term: what the peer acknowledged then is set aside, as
// cluster.start_wait says (DESIGN §7), and the two do not deadlock (the
// peer counts its copy stale, so that the primary's calls are released
// and the resync is taken).
func TestTakeoverTermStaysOverOlderTakeover(t *testing.T) {
	e := ep(5, 1)
	_, b := mirrored(e)
	// nodeA dies; nodeB takes over and serves alone, then dies too.
	b, _ = Step(b, Event{Kind: EvPeerLost})
	b, _ = Step(b, Event{Kind: EvChecked, OK: true})
	bTerm := b.Epoch
	// nodeA restarts (WAIT at e, no news of nodeB) and takes over.
	a := Machine{Name: "nodeA", ID: 1, State: Wait, Epoch: e, Preferred: true}
	a, _ = Step(a, Event{Kind: EvPeerLost})
	a, _ = Step(a, Event{Kind: EvChecked, OK: true})
	if a.State != Alone || a.Shared {
		t.Fatalf("nodeA after its takeover: %s shared %v", a.State, a.Shared)
	}
	if a.Epoch >= bTerm {
		t.Fatalf("nodeA's epoch %d not below nodeB's %d: scenario void", a.Epoch, bTerm)
	}
	// nodeB comes back: WAIT, not stale, at its term's epoch.
	b = Machine{Name: "nodeB", ID: 2, State: Wait, Epoch: bTerm}
	for i := 0; i < 5; i++ {
		b, _ = Step(b, hb(a, false))
		a, _ = Step(a, hb(b, false))
	}
	if !a.State.Serving() || !b.Stale || b.State.Serving() {
		t.Fatalf("nodeA %s (takeover term %d), nodeB %s stale %v (epoch %d): want nodeA serving and nodeB stale", a.State, a.Epoch, b.State, b.Stale, bTerm)
	}
}

// TestServiceDownPingPong: a service that fails on both nodes (a
// damaged table replicated to both, a full replicated filesystem, a bad
// config shipped in the data) moved the role back and forth for ever:
// EvServiceDown handed over whenever the peer was SECOND in sync, and
// nothing remembered that the service failed there a moment ago. Each
// move stopped the services, waited for the shipping, moved the VIP and
// drew a new epoch (a review, forty-second session). Now the node that
// gave the role up for a failed service says so (ServiceFailed) until it
// serves again, and the peer keeps the role when its service fails too;
// `duet swap` still moves it, and clears the mark.
func TestServiceDownPingPong(t *testing.T) {
	e := ep(5, 1)
	var n [2]Machine
	n[0], n[1] = mirrored(e)
	moves := 0
	settle := func() {
		// Heartbeats settle (a synced PRIM makes the peer SECOND).
		for k := 0; k < 4; k++ {
			n[0], _ = Step(n[0], hb(n[1], n[1].State == Prim))
			n[1], _ = Step(n[1], hb(n[0], n[0].State == Prim))
		}
	}
	for round := 0; round < 10; round++ {
		// The service fails on whichever node serves.
		for i := range n {
			if n[i].State.Serving() {
				var acts []Action
				n[i], acts = Step(n[i], Event{Kind: EvServiceDown, Why: "mariadb: exited 1"})
				if has(acts, DoUnserve) {
					moves++
				}
			}
		}
		settle()
	}
	if moves != 1 {
		t.Fatalf("a service failing on both nodes moved the role %d times in 10 failures, want once (now %s epoch %d / %s epoch %d)",
			moves, n[0].State, n[0].Epoch, n[1].State, n[1].Epoch)
	}
	if n[0].State != Second || !n[0].ServiceFailed || n[1].State != Prim {
		t.Fatalf("after the failures: nodeA %s (service failed %v), nodeB %s", n[0].State, n[0].ServiceFailed, n[1].State)
	}
	// The operator mends the service and moves the role back.
	var acts []Action
	n[1], acts = Step(n[1], Event{Kind: EvCmdSwap})
	if has(acts, DoRefuse) {
		t.Fatalf("swap refused: %+v", acts)
	}
	settle()
	if n[0].State != Prim || n[0].ServiceFailed {
		t.Fatalf("after the swap back: nodeA %s, service failed %v", n[0].State, n[0].ServiceFailed)
	}
	// A disk failure still moves the role to a node whose service failed.
	m := n[0]
	m.Peer.ServiceFailed = true
	if m, acts = Step(m, Event{Kind: EvDiskFailed, Why: "EIO"}); !has(acts, DoUnserve) || m.ServiceFailed {
		t.Fatalf("a failed disk kept the role: %s %+v", m.State, acts)
	}
}

// TestResumedPrimaryFoundHoldingTheVIP: as TestResumedPrimaryServesOverNewerPeer,
// but nodeB's first takeover check after its restart runs before it can
// accept nodeA's heartbeats (nodeA echoes nodeB's new run only once its
// step down is carried out, services stopped and VIP removed: about a
// timeout), and finds the VIP held by nodeA. Stale for that alone
// (StaleHeld), nodeB's copy must still win once nodeA has stepped down:
// the lab's first run of TestStalledPrimaryResumesBehindRestartedPeer
// ended with both copies stale and nothing serving.
func TestResumedPrimaryFoundHoldingTheVIP(t *testing.T) {
	for _, hearsServing := range []bool{false, true} {
		name := "nodeB hears nodeA only once it stepped down"
		if hearsServing {
			name = "nodeB hears nodeA still serving"
		}
		t.Run(name, func(t *testing.T) {
			a, b := mirrored(ep(5, 1))
			b, _ = Step(b, Event{Kind: EvPeerLost})
			b, _ = Step(b, Event{Kind: EvChecked, OK: true})
			bTerm := b.Epoch
			b = Machine{Name: "nodeB", ID: 2, State: Wait, Epoch: bTerm}
			// nodeA resumes; nodeB's check finds the VIP on it.
			b, acts := Step(b, Event{Kind: EvTick})
			if !has(acts, DoCheck) {
				t.Fatalf("nodeB, restarted, does not check: %+v", acts)
			}
			b, _ = Step(b, Event{Kind: EvChecked, Why: "VIP answered", Held: true})
			if !b.Stale || !b.StaleHeld {
				t.Fatalf("nodeB after the held check: stale %v held %v", b.Stale, b.StaleHeld)
			}
			if hearsServing {
				b, _ = Step(b, hb(a, false))
				if !b.StaleHeld {
					t.Fatal("nodeB, hearing nodeA serve a term older than its own, counted its copy stale for good")
				}
			}
			a, acts = Step(a, hb(b, false))
			if a.State.Serving() || !a.Stale || !has(acts, DoUnserve) {
				t.Fatalf("nodeA (%s) did not step down for nodeB's newer copy, stale only by the held role", a.State)
			}
			for i := 0; i < 4; i++ {
				b, _ = Step(b, hb(a, false))
				a, _ = Step(a, hb(b, false))
			}
			if !b.State.Serving() || b.Epoch <= bTerm || !a.Stale || a.State.Serving() {
				t.Fatalf("nodeB %s stale %v (epoch %d), nodeA %s stale %v: want nodeB serving its newer copy", b.State, b.Stale, b.Epoch, a.State, a.Stale)
			}
		})
	}
}

// TestHeldStaleStaysBeforeNewerHolder: a node whose check found the role
// held (StaleHeld) and then hears the holder is a peer serving a newer
// term, or WAIT and not stale with a newer copy, counts its copy stale
// for good: the exception is only for a holder that gave the role up
// for it.
func TestHeldStaleStaysBeforeNewerHolder(t *testing.T) {
	old := Machine{Name: "nodeA", ID: 1, State: Wait, Epoch: ep(5, 1), Stale: true, StaleHeld: true}
	for _, p := range []Peer{
		{Name: "nodeB", State: Alone, Epoch: ep(7, 2)},
		{Name: "nodeB", State: Prim, Epoch: ep(3, 2), Shared: false},
		{Name: "nodeB", State: Wait, Epoch: ep(7, 2)},
		{Name: "nodeB", State: Wait, Epoch: ep(7, 2), Stale: true},
		{Name: "nodeB", State: Wait, Epoch: ep(3, 2), Stale: true, StaleHeld: true},
	} {
		m, _ := Step(old, peerEv(p))
		if !m.Stale || m.State.Serving() {
			t.Errorf("after %+v: %s stale %v", p, m.State, m.Stale)
		}
		if m.StaleHeld && (p.State.Serving() || !p.Stale) {
			t.Errorf("after %+v: still stale only by the held role", p)
		}
	}
}
