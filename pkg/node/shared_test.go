package node

import (
	"strings"
	"testing"

	"github.com/duet-ha/duet/pkg/cluster"
)

// TestAdmitPrimaryRefusesOlderEpoch: the replica server's Admit refuses
// a stream from a primary whose epoch is older than this copy's while
// this node does not count its copy stale (a resumed primary whose term
// this node's takeover superseded: cluster's
// TestResumedPrimaryServesOverNewerPeer), and takes every other.
func TestAdmitPrimaryRefusesOlderEpoch(t *testing.T) {
	n := testNode(t, t.TempDir())
	newer := uint64(7<<8 | 2)
	for _, c := range []struct {
		name   string
		m      cluster.Machine
		epoch  uint64
		refuse bool
	}{
		{"newer copy, not stale, WAIT", cluster.Machine{State: cluster.Wait, Epoch: newer}, 5<<8 | 1, true},
		{"newer copy, not stale, SECOND", cluster.Machine{State: cluster.Second, Epoch: newer}, 5<<8 | 1, true},
		{"newer copy counted stale", cluster.Machine{State: cluster.Wait, Epoch: newer, Stale: true}, 5<<8 | 1, false},
		{"same epoch", cluster.Machine{State: cluster.Second, Epoch: newer}, newer, false},
		{"the primary's epoch newer", cluster.Machine{State: cluster.Wait, Epoch: 5<<8 | 1}, newer, false},
		{"a sender of an older version (no epoch)", cluster.Machine{State: cluster.Wait, Epoch: newer}, 0, false},
		{"a fresh node (epoch 0)", cluster.Machine{State: cluster.Wait}, 5<<8 | 1, false},
	} {
		m := c.m
		n.machine.Store(&m)
		why := n.admitPrimary(c.epoch)
		if (why != "") != c.refuse {
			t.Errorf("%s: refused %q, want refused %v", c.name, why, c.refuse)
		}
		if why != "" && !strings.Contains(why, "not stale") {
			t.Errorf("%s: the refusal does not say why: %q", c.name, why)
		}
	}
	var none Node
	if why := none.admitPrimary(5); why != "" {
		t.Errorf("no machine yet: refused %q", why)
	}
}

// TestHeartbeatSaysShared: the heartbeats of a node that serves on
// in the term it had with its peer say so (the peer, newer, waits for it
// to step down rather than counting its copy stale); not once it left
// the role, nor in a takeover's term.
func TestHeartbeatSaysShared(t *testing.T) {
	prim := cluster.Machine{Name: "nodeA", ID: 1, State: cluster.Prim, Epoch: 4<<8 | 1,
		Peer: cluster.Peer{Seen: true, Name: "nodeB", State: cluster.Second, Epoch: 4<<8 | 1}}
	n, _ := stateDirWritesFail(t, prim)
	n.machine.Store(&prim)
	if n.heartbeat().Shared {
		t.Error("a PRIM not heard at its epoch yet says shared")
	}
	heard, _ := cluster.Step(prim, cluster.Event{Kind: cluster.EvPeer, Peer: prim.Peer})
	alone, _ := cluster.Step(heard, cluster.Event{Kind: cluster.EvPeerLost})
	if alone.State != cluster.Alone || !alone.Shared {
		t.Fatalf("PRIM after losing its peer: %s shared %v", alone.State, alone.Shared)
	}
	n.machine.Store(&alone)
	if h := n.heartbeat(); !h.Shared || h.Epoch != 5<<8|1 {
		t.Errorf("ALONE after PRIM: heartbeat shared %v epoch %d", h.Shared, h.Epoch)
	}
	if n.clusterEpoch() != 5<<8|1 {
		t.Errorf("the primaries' hello epoch %d, want %d", n.clusterEpoch(), 5<<8|1)
	}
	taken, _ := cluster.Step(cluster.Machine{Name: "nodeA", ID: 1, State: cluster.Wait, Epoch: 4<<8 | 1},
		cluster.Event{Kind: cluster.EvChecked, OK: true})
	if !taken.State.Serving() {
		t.Fatalf("takeover: %s", taken.State)
	}
	n.machine.Store(&taken)
	if n.heartbeat().Shared {
		t.Error("a takeover's term, its peer not heard, says shared")
	}
	gone := alone
	gone.State = cluster.Wait // as no step leaves it: a heartbeat says it only serving
	n.machine.Store(&gone)
	if n.heartbeat().Shared {
		t.Error("a node that does not serve says shared")
	}
}

// TestStaleHeldSavedSaidAndAdmitted: a copy stale only because a check
// found the role held (cluster.Machine.StaleHeld) keeps that across a
// restart (cluster.json) and says it in its heartbeats; it still refuses
// a primary with an older epoch (which may be about to step down for
// it), and a primary that left the role for it releases nothing alone
// on its "stale".
func TestStaleHeldSavedSaidAndAdmitted(t *testing.T) {
	dir := t.TempDir()
	n := testNode(t, dir)
	held := cluster.Machine{Name: "nodeB", ID: 2, State: cluster.Wait, Epoch: 7<<8 | 2, Stale: true, StaleHeld: true}
	if err := n.persist(held); err != nil {
		t.Fatal(err)
	}
	got, err := n.loadMachine()
	if err != nil || !got.Stale || !got.StaleHeld || got.Epoch != held.Epoch {
		t.Fatalf("restarted: %+v %v, want stale only by the held role", got, err)
	}
	for _, st := range []cluster.State{cluster.Prim, cluster.Alone, cluster.Second} {
		m := held
		m.State = st
		if err := n.persist(m); err != nil {
			t.Fatal(err)
		}
		if got, _ := n.loadMachine(); got.StaleHeld {
			t.Errorf("saved %s: loads stale only by the held role", st)
		}
	}
	n.machine.Store(&held)
	if why := n.admitPrimary(5<<8 | 1); why == "" {
		t.Error("a copy stale only by the held role took an older primary's stream")
	}
	plain := held
	plain.StaleHeld = false
	n.machine.Store(&plain)
	if why := n.admitPrimary(5<<8 | 1); why != "" {
		t.Errorf("a stale copy refused the primary: %q", why)
	}

	// nodeA, left the role for nodeB's newer copy that says stale only
	// by the held role: nothing released alone.
	a, _ := stateDirWritesFail(t, cluster.Machine{Name: "nodeA", ID: 1, State: cluster.Wait, Epoch: 5<<8 | 1})
	a.machine.Store(&cluster.Machine{Name: "nodeA", ID: 1, State: cluster.Wait, Epoch: 5<<8 | 1, Stale: true,
		Peer: cluster.Peer{Seen: true, Name: "nodeB", State: cluster.Wait, Epoch: 7<<8 | 2, Stale: true, StaleHeld: true}})
	if a.peerCannotTakeOver() {
		t.Error("a node leaving the role for its peer's newer copy releases calls alone on the peer's held-role stale")
	}
	a.machine.Store(&cluster.Machine{Name: "nodeA", ID: 1, State: cluster.Prim, Epoch: 8<<8 | 1,
		Peer: cluster.Peer{Seen: true, Name: "nodeB", State: cluster.Wait, Epoch: 7<<8 | 2, Stale: true, StaleHeld: true}})
	if !a.peerCannotTakeOver() {
		t.Error("a serving node does not release on a peer stale by the held role")
	}
	h := cluster.Machine{Name: "nodeB", ID: 2, State: cluster.Wait, Epoch: 7<<8 | 2, Stale: true, StaleHeld: true}
	hn, _ := stateDirWritesFail(t, h)
	hn.machine.Store(&h)
	if hb := hn.heartbeat(); !hb.Stale || !hb.StaleHeld {
		t.Errorf("heartbeat stale %v held %v, want both", hb.Stale, hb.StaleHeld)
	}
}

// TestServiceFailedSaidAndNoFailback: a node that gave the role up for a
// failed service says so in its heartbeats, and failback (cluster.prefer)
// does not hand the role back to it while it does: the service would
// fail there again and the role move back and forth at every
// failback_delay (cluster's TestServiceDownPingPong).
func TestServiceFailedSaidAndNoFailback(t *testing.T) {
	giver := cluster.Machine{Name: "nodeA", ID: 1, State: cluster.Second, Epoch: 6<<8 | 2, ServiceFailed: true}
	n, _ := stateDirWritesFail(t, giver)
	n.machine.Store(&giver)
	if !n.heartbeat().ServiceFailed {
		t.Error("the heartbeats of a node whose service failed do not say so")
	}
	prim := cluster.Machine{Name: "nodeB", ID: 2, State: cluster.Prim, Epoch: 6<<8 | 2,
		Peer: cluster.Peer{Seen: true, Name: "nodeA", State: cluster.Second, Epoch: 6<<8 | 2}}
	if !failbackCandidate(prim, "nodeA") {
		t.Fatal("no failback to a preferred mirror: the test sees nothing")
	}
	prim.Peer.ServiceFailed = true
	if failbackCandidate(prim, "nodeA") {
		t.Error("failback to a node that gave the role up for a failed service")
	}
}

// TestYieldingSaidInStatus: every heartbeat says Yields (the peer, a
// Shared primary, steps down only for a node of a version that waits
// for it), and a WAIT node waiting for such a primary's step down says
// why in `duet status` (waiting_for_peer): if the step down never
// comes, the primary does not hear it.
func TestYieldingSaidInStatus(t *testing.T) {
	w := cluster.Machine{Name: "nodeB", ID: 2, State: cluster.Wait, Epoch: 7<<8 | 2,
		Peer: cluster.Peer{Seen: true, Name: "nodeA", State: cluster.Alone, Epoch: 5<<8 | 1, Shared: true, Yields: true}}
	n, _ := stateDirWritesFail(t, w)
	n.machine.Store(&w)
	if !n.heartbeat().Yields {
		t.Error("the heartbeats do not say Yields")
	}
	if why := n.waitingForPeer(); !strings.Contains(why, "steps down for this copy") {
		t.Errorf("waiting for a Shared primary's step down, status says %q", why)
	}
	w.Peer.Shared = false
	n.machine.Store(&w)
	if why := n.waitingForPeer(); strings.Contains(why, "steps down") {
		t.Errorf("a primary that does not step down: status says %q", why)
	}
}
