package cluster

import "testing"

// From a review of the swap and handover paths (forty-first session):
// each test failed on cd02e3f.

// checkGraced says whether acts hold a DoCheck, and whether it waits a
// further cluster.timeout (Grace).
func checkGraced(acts []Action) (check, grace bool) {
	for _, a := range acts {
		if a.Do == DoCheck {
			return true, a.Grace
		}
	}
	return false, false
}

// TestSwapTargetStoppedGiverServesAgain: `duet swap` on nodeA (PRIM) while
// `duet stop` is run on its SECOND nodeB during nodeA's unserve (the
// services' stop can take their stop timeouts). nodeB, stopped while
// nodeA is still heard PRIM, goes STOP and stale (state.go EvCmdStop) and
// never serves on its own; it never drew a newer epoch. nodeA, WAIT and
// handed over, hears nodeB STOP stale at nodeA's own epoch: stepWait only
// ends a handover on a receiver heard serving or WAIT (the "receiverBack"
// rule), so nodeA keeps claiming nothing for as long as nodeB's daemon
// runs and sends heartbeats. `duet prim` on nodeA is refused ("handed the
// primary role to nodeB, which may have served since") although nodeB's
// heartbeats say it never did. Nothing serves until an operator forces.
func TestSwapTargetStoppedGiverServesAgain(t *testing.T) {
	e := ep(5, 1)
	giver, recv := mirrored(e)

	giver, _ = Step(giver, Event{Kind: EvCmdSwap})
	if giver.State != Wait || !giver.HandedOver {
		t.Fatalf("swap: %s handed over %v", giver.State, giver.HandedOver)
	}
	// duet stop on nodeB while nodeA is still leaving (heard PRIM).
	recv, _ = Step(recv, Event{Kind: EvCmdStop})
	if recv.State != Stop || !recv.Stale {
		t.Fatalf("nodeB after duet stop: %s stale %v", recv.State, recv.Stale)
	}
	// nodeB (STOP) hears the handover: it does nothing.
	recv, acts := Step(recv, peerEv(Peer{Name: "nodeA", State: giver.State, Epoch: giver.Epoch, Handover: true, Preferred: true}))
	if recv.State.Serving() || has(acts, DoServe) {
		t.Fatalf("a stopped nodeB served")
	}
	// nodeA hears nodeB STOP, stale, same epoch, for a while.
	for i := 0; i < 50 && !giver.State.Serving(); i++ {
		giver, _ = Step(giver, peerEv(Peer{Name: "nodeB", State: recv.State, Epoch: recv.Epoch, Stale: recv.Stale}))
		giver, _ = Step(giver, Event{Kind: EvTick})
	}
	_, pa := Step(giver, Event{Kind: EvCmdPrim})
	if !giver.State.Serving() {
		t.Fatalf("nodeA handed the role to nodeB, which was stopped (STOP, stale, epoch %d = nodeA's: it never served and never will on its own): "+
			"nodeA stays %s (handed over %v) for as long as it hears nodeB; nothing serves; plain `duet prim` on nodeA refused=%v",
			recv.Epoch, giver.State, giver.HandedOver, has(pa, DoRefuse))
	}
}

// TestSwapCutBothTakeOver: the handover leaves the VIP free on purpose
// (node.unserve removes it before the WAIT+Handover heartbeat goes out).
// If the nodes stop hearing each other both ways right then (the nemesis
// kind split-heartbeat-path: node addresses cut, witness reachable, ARP
// crossing), the two sides decide at the same time: the giver takes the
// role back (step: HandedOver && Peer.Seen && EvPeerLost) and the
// receiver, a SECOND that lost its primary, takes over. Each one's checks
// probed a VIP that nobody held, both served ALONE and released calls
// (the witness answered), and on meeting the one with the older epoch
// stepped down: what it acknowledged was replaced. Outside a handover
// the old primary keeps the VIP through a cut and the probe settles it.
//
// The VIP is one shared owner; a check passes iff nobody owns it when
// its probe runs. Checks without Grace run at once, both probing before
// either adds the address (the race the review found); a graced check
// runs a cluster.timeout later, after every check that was not.
func TestSwapCutBothTakeOver(t *testing.T) {
	e := ep(5, 1)
	giver := Machine{Name: "nodeA", ID: 1, State: Prim, Epoch: e,
		Peer: Peer{Seen: true, Name: "nodeB", State: Second, Epoch: e}}
	recv := Machine{Name: "nodeB", ID: 2, State: Second, Epoch: e,
		Peer: Peer{Seen: true, Name: "nodeA", State: Prim, Epoch: e, Synced: true}}
	var acts []Action
	giver, acts = Step(giver, Event{Kind: EvCmdSwap})
	if !has(acts, DoUnserve) {
		t.Fatal("no unserve")
	}
	owner := "" // unserve removed the VIP; the WAIT+Handover heartbeat is lost (cut)

	// Both declare the other lost (cluster.timeout) and start checks.
	giver, ga := Step(giver, Event{Kind: EvPeerLost})
	recv, ra := Step(recv, Event{Kind: EvPeerLost})
	gCheck, gGrace := checkGraced(ga)
	rCheck, rGrace := checkGraced(ra)
	if !gCheck || !rCheck {
		t.Fatalf("checks: giver %v receiver %v", gCheck, rCheck)
	}
	if rGrace {
		t.Fatal("a SECOND's takeover waits a grace: failover is slower than it need be")
	}
	type side struct {
		m     *Machine
		grace bool
	}
	sides := []side{{&giver, gGrace}, {&recv, rGrace}}
	// Ungraced checks: all probe, then all that passed serve.
	// Graced ones: the same, afterwards.
	for _, graced := range []bool{false, true} {
		var passed []*Machine
		for _, s := range sides {
			if s.grace == graced {
				free := owner == ""
				next, acts := Step(*s.m, Event{Kind: EvChecked, OK: free, Held: !free, Why: "VIP held"})
				*s.m = next
				if has(acts, DoServe) {
					passed = append(passed, s.m)
				}
			}
		}
		for _, m := range passed {
			if owner == "" {
				owner = m.Name
			}
		}
	}
	if giver.State.Serving() && recv.State.Serving() {
		g2, _ := Step(giver, peerEv(Peer{Name: recv.Name, State: recv.State, Epoch: recv.Epoch}))
		r2, _ := Step(recv, peerEv(Peer{Name: giver.Name, State: giver.State, Epoch: giver.Epoch}))
		t.Fatalf("a cut right after the handover: the giver took the role back (%s, epoch %d) and the receiver took over (%s, epoch %d): "+
			"two primaries, each releasing calls ALONE; on meeting giver serving=%v receiver serving=%v (the loser's acknowledged writes are replaced)",
			giver.State, giver.Epoch, recv.State, recv.Epoch, g2.State.Serving(), r2.State.Serving())
	}
	if !giver.State.Serving() && !recv.State.Serving() {
		t.Fatalf("nothing serves: giver %s, receiver %s", giver.State, recv.State)
	}
	// The receiver, had it died instead, is not waited for forever: the
	// giver's graced check finds the VIP free and takes the role back.
	g := Machine{Name: "nodeA", ID: 1, State: Prim, Epoch: e, Peer: Peer{Seen: true, Name: "nodeB", State: Second, Epoch: e}}
	g, _ = Step(g, Event{Kind: EvCmdSwap})
	g, _ = Step(g, Event{Kind: EvPeerLost})
	if g, acts = Step(g, Event{Kind: EvChecked, OK: true}); !g.State.Serving() || !has(acts, DoServe) {
		t.Fatalf("the receiver died during the handover: the giver's takeback checks passed, yet it is %s", g.State)
	}
}
