package node

import (
	"context"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/duet-ha/duet/pkg/cluster"
	"github.com/duet-ha/duet/pkg/replica"
)

// restarted is a new daemon on stateDir, as after a crash: its machine
// loaded, its start wait read, the VIP free (the peer is down).
func restarted(t *testing.T, stateDir, startWait string) (*Node, cluster.Machine) {
	t.Helper()
	n := testNode(t, stateDir)
	n.cfg.Node = "nodeA"
	n.cfg.Cluster.StartWait = startWait
	n.vipProbe = func() (bool, string) { return true, "" }
	m, err := n.loadMachine()
	if err != nil {
		t.Fatal(err)
	}
	n.loadStartWait(m)
	n.machine.Store(&m)
	return n, m
}

// primWithMark is nodeA on stateDir, PRIM at epoch e next to peer, its
// state saved and the peer-in-sync mark made (as its first "synced"
// heartbeat does).
func primWithMark(t *testing.T, stateDir string, e uint64, peer cluster.Peer) (*Node, cluster.Machine) {
	t.Helper()
	a := testNode(t, stateDir)
	a.cfg.Node = "nodeA"
	prim := cluster.Machine{Name: "nodeA", ID: 1, State: cluster.Prim, Epoch: e, Peer: peer}
	if err := a.persist(prim); err != nil {
		t.Fatal(err)
	}
	if !a.markPeerSynced(e) {
		t.Fatal("the peer-in-sync mark was not made for the PRIM term")
	}
	return a, prim
}

// takesOver steps m through a tick and the takeover checks n makes.
func takesOver(t *testing.T, n *Node, m cluster.Machine) (bool, string) {
	t.Helper()
	m, acts := cluster.Step(m, cluster.Event{Kind: cluster.EvTick})
	checks := false
	for _, a := range acts {
		checks = checks || a.Do == cluster.DoCheck
	}
	if !checks {
		t.Fatalf("no takeover checks after a tick in %+v", m)
	}
	ok, why, held := n.takeoverChecks(context.Background())
	m, _ = cluster.Step(m, cluster.Event{Kind: cluster.EvChecked, OK: ok, Why: why, Held: held})
	return m.State.Serving(), why
}

// TestStartWaitAfterFailuresInTurn: the site loses its power node by
// node. nodeA serves with nodeB in sync (its heartbeats said so), and
// dies; nodeB takes over, acknowledges writes alone, and dies too. Only
// nodeA comes back. Its saved state says PRIM: without the start wait it
// passes its checks (nothing answers for the VIP) and serves its older
// copy, and what nodeB acknowledged is set aside when nodeB returns
// (DESIGN §8). With it, nodeA waits for nodeB (cluster.start_wait).
func TestStartWaitAfterFailuresInTurn(t *testing.T) {
	const e = 4<<8 | 1
	dir := t.TempDir()
	// The heartbeat that says "synced" (and turns nodeB SECOND) makes
	// the mark first.
	primWithMark(t, dir, e, cluster.Peer{Seen: true, Name: "nodeB", State: cluster.Second, Epoch: e})
	// nodeB, SECOND in sync, loses nodeA and takes over: ALONE, newer
	// epoch, writes acknowledged alone. Then nodeB dies.
	b := cluster.Machine{Name: "nodeB", ID: 2, State: cluster.Second, Epoch: e,
		Peer: cluster.Peer{Seen: true, Name: "nodeA", State: cluster.Prim, Epoch: e, Synced: true}}
	b, _ = cluster.Step(b, cluster.Event{Kind: cluster.EvPeerLost})
	b, _ = cluster.Step(b, cluster.Event{Kind: cluster.EvChecked, OK: true})
	if b.State != cluster.Alone || b.Epoch <= e {
		t.Fatalf("the test sees nothing: nodeB did not take over (%s, epoch %d)", b.State, b.Epoch)
	}

	// nodeA alone comes back.
	n, m := restarted(t, dir, "forever")
	if m.Stale {
		t.Fatal("the test sees nothing: nodeA's copy loads as stale")
	}
	if serves, why := takesOver(t, n, m); serves {
		t.Fatalf("nodeA, back alone after serving with nodeB in sync, served its copy (epoch %d) while nodeB may hold writes it acknowledged alone (epoch %d)", e, b.Epoch)
	} else if !strings.Contains(why, "not heard from the peer") {
		t.Fatalf("not taking over, but why: %q", why)
	}
	if s := n.waitingForPeer(); !strings.Contains(s, "cluster.start_wait forever") {
		t.Errorf("status start_wait %q: want the reason", s)
	}

	// Once the peer is heard, heartbeats decide: no more waiting.
	n.peerHeard.Store(true)
	if ok, why := n.startWaitCheck(); !ok {
		t.Errorf("still waiting after the peer was heard: %s", why)
	}

	// A bounded wait ends.
	n, m = restarted(t, dir, "50ms")
	if serves, _ := takesOver(t, n, m); serves {
		t.Fatal("served at once with start_wait 50ms")
	}
	time.Sleep(60 * time.Millisecond)
	if serves, why := takesOver(t, n, m); !serves {
		t.Fatalf("start_wait 50ms passed and the node does not serve: %s", why)
	}

	// start_wait 0s: today's behaviour, no wait.
	n, m = restarted(t, dir, "0s")
	if serves, why := takesOver(t, n, m); !serves {
		t.Fatalf("start_wait 0s and the node does not serve: %s", why)
	}
}

// TestStartWaitNotAfterAlone: a node whose last save says it served
// ALONE (its peer lost, then unable to take over from it: the VIP
// answered), or that was stopped after its peer said it is stale, or that
// never had its peer in sync in its term, serves after a start without
// waiting.
func TestStartWaitNotAfterAlone(t *testing.T) {
	const e = 4<<8 | 1
	for _, tc := range []struct {
		name string
		last cluster.Machine
	}{
		{"alone", cluster.Machine{Name: "nodeA", ID: 1, State: cluster.Alone, Epoch: e + 1<<8}},
		{"stopped, the peer stale", cluster.Machine{Name: "nodeA", ID: 1, State: cluster.Stop, Epoch: e,
			Peer: cluster.Peer{Seen: true, Name: "nodeB", State: cluster.Stop, Epoch: e, Stale: true}}},
		{"new term", cluster.Machine{Name: "nodeA", ID: 1, State: cluster.Prim, Epoch: e + 2<<8}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			a, _ := primWithMark(t, dir, e, cluster.Peer{})
			if err := a.persist(tc.last); err != nil {
				t.Fatal(err)
			}
			if _, err := os.Stat(a.peerSyncedMarkPath()); err == nil {
				t.Fatalf("the mark outlived a save of %s epoch %d", tc.last.State, tc.last.Epoch)
			}
			// A heartbeat built from the machine read before the save
			// makes no mark again.
			if a.markPeerSynced(e) {
				t.Fatal("a heartbeat of the ended term made the mark again")
			}
			if tc.last.State == cluster.Stop {
				return // a stopped node does not take over on its own
			}
			n, _ := restarted(t, dir, "forever")
			if ok, why := n.startWaitCheck(); !ok {
				t.Fatalf("waits after a last save of %s: %s", tc.last.State, why)
			}
		})
	}
}

// TestStartWaitKeptAcrossRestarts: a node that restarts during its start
// wait, after saving WAIT (not stale), still waits.
func TestStartWaitKeptAcrossRestarts(t *testing.T) {
	const e = 4<<8 | 1
	dir := t.TempDir()
	primWithMark(t, dir, e, cluster.Peer{})
	n, m := restarted(t, dir, "forever")
	if err := n.persist(m); err != nil { // WAIT, not stale
		t.Fatal(err)
	}
	n, m = restarted(t, dir, "forever")
	if ok, _ := n.startWaitCheck(); ok {
		t.Fatal("a restart during the start wait, after a save of WAIT, does not wait any more")
	}
	// `duet stop`, then `duet start` (or a restart): still waits.
	m, _ = cluster.Step(m, cluster.Event{Kind: cluster.EvCmdStop})
	if err := n.persist(m); err != nil {
		t.Fatal(err)
	}
	n, m = restarted(t, dir, "forever")
	if ok, _ := n.startWaitCheck(); ok {
		t.Fatal("duet stop during the start wait, then a start: no wait any more")
	}
	// `duet prim` ends it: the node serves a new term.
	m, _ = cluster.Step(m, cluster.Event{Kind: cluster.EvCmdStart})
	m, acts := cluster.Step(m, cluster.Event{Kind: cluster.EvCmdPrim})
	if !m.State.Serving() {
		t.Fatalf("duet prim during the start wait: %s %v", m.State, acts)
	}
	if err := n.persist(m); err != nil {
		t.Fatal(err)
	}
	if ok, why := n.startWaitCheck(); !ok {
		t.Errorf("still waiting after serving: %s", why)
	}
	n, _ = restarted(t, dir, "forever")
	if ok, why := n.startWaitCheck(); !ok {
		t.Errorf("waits after a restart of the term duet prim began (the peer never in sync in it): %s", why)
	}
}

// TestStartWaitAfterStopBeforePeerSecondHeard (from a review): nodeA, PRIM
// with the mark, is stopped (`duet stop`) before it applied the heartbeat
// in which nodeB turned SECOND: the stop is "no peer in sync", without a
// handover, and nodeB, SECOND, hearing STOP, serves. If nodeB then serves
// alone and dies, nodeA, restarted alone, must wait: the save of STOP
// keeps the mark unless nodeB's last word (current) was "stale".
func TestStartWaitAfterStopBeforePeerSecondHeard(t *testing.T) {
	const e = 4<<8 | 1
	dir := t.TempDir()
	a, prim := primWithMark(t, dir, e, cluster.Peer{Seen: true, Name: "nodeB", State: cluster.Wait, Epoch: e})
	stopped, acts := cluster.Step(prim, cluster.Event{Kind: cluster.EvCmdStop})
	if stopped.State != cluster.Stop || stopped.HandedOver {
		t.Fatalf("the test sees nothing: the stop is %s handed over %v (%+v)", stopped.State, stopped.HandedOver, acts)
	}
	if err := a.persist(stopped); err != nil {
		t.Fatal(err)
	}
	// nodeB, SECOND at e, hears STOP and serves.
	b := cluster.Machine{Name: "nodeB", ID: 2, State: cluster.Second, Epoch: e,
		Peer: cluster.Peer{Seen: true, Name: "nodeA", State: cluster.Prim, Epoch: e, Synced: true}}
	for i := 0; i < 2; i++ {
		b, _ = cluster.Step(b, cluster.Event{Kind: cluster.EvPeer, Peer: cluster.Peer{Name: "nodeA", State: cluster.Stop, Epoch: e}})
	}
	if !b.State.Serving() {
		t.Fatalf("the test sees nothing: nodeB does not serve next to a stopped nodeA (%s)", b.State)
	}
	n, m := restarted(t, dir, "forever")
	if serves, _ := takesOver(t, n, m); serves {
		t.Fatal("nodeA, stopped before it heard nodeB SECOND, served alone at its next start: nodeB may have served after it")
	}
}

// TestLeavingHeartbeatSyncedOnlyWithMark (from a review): while a node
// leaves the role its heartbeats repeat their last "synced"; a stop whose
// peer said stale removed the mark, and a peer started meanwhile must not
// turn SECOND on such a heartbeat (this node could then restart alone
// without waiting for it).
func TestLeavingHeartbeatSyncedOnlyWithMark(t *testing.T) {
	const e = 4<<8 | 1
	n, prim := primWithMark(t, t.TempDir(), e, cluster.Peer{Seen: true, Name: "nodeB", State: cluster.Stop, Epoch: e, Stale: true})
	var err error
	if n.guard, err = newGuard(n.cfg); err != nil {
		t.Fatal(err)
	}
	n.machine.Store(&prim)
	n.lastSynced.Store(true) // the last heartbeat said synced
	stopped, _ := cluster.Step(prim, cluster.Event{Kind: cluster.EvCmdStop})
	if err := n.persist(stopped); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(n.peerSyncedMarkPath()); err == nil {
		t.Fatal("the test sees nothing: the stop kept the mark")
	}
	n.leaving.Store(true) // unserve: the published state is still PRIM
	if h := n.heartbeat(); h.Synced {
		t.Fatalf("a leaving heartbeat says PRIM epoch %d synced with no peer-in-sync mark on disk", h.Epoch)
	}
}

// TestStartWaitEndsOnlyOnASettlingHeartbeat (from a review): a peer heard
// WAIT with a newer copy, not stale, may die again before it serves: the
// start wait goes on. A serving peer, a stale one, or one with no newer
// epoch ends it.
func TestStartWaitEndsOnlyOnASettlingHeartbeat(t *testing.T) {
	const e = 4<<8 | 1
	for _, tc := range []struct {
		p    cluster.Peer
		ends bool
	}{
		{cluster.Peer{State: cluster.Wait, Epoch: e + 3<<8}, false},
		{cluster.Peer{State: cluster.Stop, Epoch: e + 3<<8}, false},
		{cluster.Peer{State: cluster.Wait, Epoch: e + 3<<8, Stale: true}, true},
		{cluster.Peer{State: cluster.Alone, Epoch: e + 3<<8}, true},
		{cluster.Peer{State: cluster.Wait, Epoch: e}, true},
		{cluster.Peer{State: cluster.Stop, Epoch: e - 1<<8}, true},
	} {
		if got := peerEndsStartWait(tc.p, e); got != tc.ends {
			t.Errorf("peer %s epoch %d stale %v: ends the wait %v, want %v", tc.p.State, tc.p.Epoch, tc.p.Stale, got, tc.ends)
		}
	}
}

// TestMarkLeftWithoutStateRemoved (from a review): a mark whose
// cluster.json was moved away (a fresh start) is removed, and a mark
// whose directory fsync failed is still removed by the next save.
func TestMarkLeftWithoutStateRemoved(t *testing.T) {
	dir := t.TempDir()
	a := testNode(t, dir)
	if err := os.WriteFile(a.peerSyncedMarkPath(), nil, 0o600); err != nil {
		t.Fatal(err)
	}
	n, _ := restarted(t, dir, "forever")
	if ok, why := n.startWaitCheck(); !ok {
		t.Errorf("a fresh node (no cluster.json) waits for a leftover mark: %s", why)
	}
	if _, err := os.Stat(n.peerSyncedMarkPath()); err == nil {
		t.Error("the leftover mark is still there")
	}
	// A mark made but not known by epoch (markOn alone) goes with ALONE.
	n.markMu.Lock()
	n.markOn = true
	n.markMu.Unlock()
	os.WriteFile(n.peerSyncedMarkPath(), nil, 0o600)
	if err := n.persist(cluster.Machine{Name: "nodeB", State: cluster.Alone, Epoch: 2<<8 | 2}); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(n.peerSyncedMarkPath()); err == nil {
		t.Error("the mark outlived a save of ALONE")
	}
}

// TestWaitingForStoppedNewerPeerSaid: a WAIT node next to a stopped peer
// with a newer copy takes nothing over (TestStoppedNewerPeerNotServedOver);
// status says why and what to run.
func TestWaitingForStoppedNewerPeerSaid(t *testing.T) {
	const e = 4<<8 | 1
	n := testNode(t, t.TempDir())
	n.machine.Store(&cluster.Machine{Name: "nodeA", ID: 1, State: cluster.Wait, Epoch: e, Stale: true,
		Peer: cluster.Peer{Seen: true, Name: "nodeB", State: cluster.Stop, Epoch: e + 3<<8}})
	if got := n.waitingForPeer(); !strings.Contains(got, "nodeB is stopped and its copy is newer") || !strings.Contains(got, "duet start") || !strings.Contains(got, "duet prim --force") {
		t.Errorf("waiting for peer: %q", got)
	}
	n.machine.Store(&cluster.Machine{Name: "nodeA", ID: 1, State: cluster.Wait, Epoch: e,
		Peer: cluster.Peer{Seen: true, Name: "nodeB", State: cluster.Stop, Epoch: e}})
	if got := n.waitingForPeer(); got != "" {
		t.Errorf("an older stopped peer: waiting %q", got)
	}
}

// markPeerSynced is what a heartbeat does before it says "synced".
func (n *Node) markPeerSynced(epoch uint64) bool {
	n.markMu.Lock()
	defer n.markMu.Unlock()
	return n.markPeerSyncedLocked(epoch)
}

// TestStepDownAfterAloneWaitsForPeer (from a review): nodeA, PRIM with
// nodeB in sync, loses nodeB and the witness: ALONE, then isolated, it
// steps down and frees the VIP. That is when nodeB, cut off but alive and
// in sync, may take over (its checks pass), serve alone and die. nodeA,
// its network back, must not serve its older copy, running on or
// restarted: the step-down made the mark again and armed the wait. A
// daemon stopped while ALONE (SIGTERM) does the same (leftAlone). But an
// ALONE node that crashes (its peer lost first: the secondary's crash)
// does not wait at its restart: its peer could not take over from it.
func TestStepDownAfterAloneWaitsForPeer(t *testing.T) {
	const e = 4<<8 | 1
	peer := cluster.Peer{Seen: true, Name: "nodeB", State: cluster.Second, Epoch: e}

	dir := t.TempDir()
	a, prim := primWithMark(t, dir, e, peer)
	alone, _ := cluster.Step(prim, cluster.Event{Kind: cluster.EvPeerLost})
	if alone.State != cluster.Alone {
		t.Fatalf("the test sees nothing: %s after the peer was lost", alone.State)
	}
	if err := a.persist(alone); err != nil {
		t.Fatal(err)
	}
	// A crash now: the restart does not wait.
	if n, _ := restarted(t, dir, "forever"); n.startWait.Load() {
		t.Fatal("a node that crashed while ALONE waits at its restart: its peer, lost first, could not take over")
	}
	// Isolated: it steps down.
	down, acts := cluster.Step(alone, cluster.Event{Kind: cluster.EvIsolated})
	if down.State != cluster.Wait || down.Stale {
		t.Fatalf("the test sees nothing: isolation gives %s stale %v (%+v)", down.State, down.Stale, acts)
	}
	if err := a.persist(down); err != nil {
		t.Fatal(err)
	}
	a.vipProbe = func() (bool, string) { return true, "" }
	a.machine.Store(&down)
	if serves, _ := takesOver(t, a, down); serves {
		t.Fatal("nodeA, stepped down after losing nodeB in sync, takes over again while nodeB may have served since")
	}
	if n, m := restarted(t, dir, "forever"); !n.startWait.Load() {
		t.Fatal("nodeA, restarted after stepping down, does not wait for nodeB")
	} else if serves, _ := takesOver(t, n, m); serves {
		t.Fatal("nodeA, restarted after stepping down, serves")
	}

	// SIGTERM while ALONE.
	dir = t.TempDir()
	a, prim = primWithMark(t, dir, e, peer)
	alone, _ = cluster.Step(prim, cluster.Event{Kind: cluster.EvPeerLost})
	if err := a.persist(alone); err != nil {
		t.Fatal(err)
	}
	a.leftAlone()
	if n, _ := restarted(t, dir, "forever"); !n.startWait.Load() {
		t.Fatal("nodeA, its daemon stopped while ALONE after losing nodeB in sync, does not wait for nodeB at its restart")
	}
}

// TestStoppedPeerNotToldSynced (from a review): a stopped peer ignores
// "synced"; said to it, it keeps moving the time its "stale" must echo,
// and a stop of this node (the README's shutdown: the secondary first)
// would keep the mark about half the time, and a start of this node
// alone would wait for ever.
func TestStoppedPeerNotToldSynced(t *testing.T) {
	const e = 4<<8 | 1
	for _, tc := range []struct {
		peer   cluster.Peer
		synced bool
	}{
		{cluster.Peer{Seen: true, Name: "nodeB", State: cluster.Second, Epoch: e}, true},
		{cluster.Peer{Seen: true, Name: "nodeB", State: cluster.Stop, Epoch: e, Stale: true}, false},
	} {
		n, prim := primWithMark(t, t.TempDir(), e, tc.peer)
		var err error
		if n.guard, err = newGuard(n.cfg); err != nil {
			t.Fatal(err)
		}
		n.primaries = []*replica.Primary{streamingPrimary(t)}
		n.machine.Store(&prim)
		if h := n.heartbeat(); h.Synced != tc.synced {
			t.Errorf("peer %s: the heartbeat says synced %v, want %v", tc.peer.State, h.Synced, tc.synced)
		}
	}
}

// TestLongAloneStepDownServesAgain (from a review): nodeB's host dies
// while SECOND; nodeA serves ALONE for days (nodeB, alive, could only
// have taken over at its first check after the loss: a failed check makes
// a SECOND stale). A witness blip then steps nodeA down: it must serve
// again once the witness answers, not wait for nodeB for ever.
func TestLongAloneStepDownServesAgain(t *testing.T) {
	const e = 4<<8 | 1
	dir := t.TempDir()
	a, prim := primWithMark(t, dir, e, cluster.Peer{Seen: true, Name: "nodeB", State: cluster.Second, Epoch: e})
	alone, _ := cluster.Step(prim, cluster.Event{Kind: cluster.EvPeerLost})
	if err := a.persist(alone); err != nil {
		t.Fatal(err)
	}
	a.markMu.Lock()
	a.aloneSince = a.aloneSince.Add(-48 * time.Hour) // days later
	a.markMu.Unlock()
	down, _ := cluster.Step(alone, cluster.Event{Kind: cluster.EvIsolated})
	if err := a.persist(down); err != nil {
		t.Fatal(err)
	}
	a.vipProbe = func() (bool, string) { return true, "" }
	a.machine.Store(&down)
	if serves, why := takesOver(t, a, down); !serves {
		t.Errorf("ALONE for days after its peer died, stepped down by a witness blip: never serves again on its own: %s", why)
	}
}

// TestForcedAloneNotFromSynced (from a review): nodeA in its start wait,
// nodeB never back, `duet prim`: an ALONE term with no peer in sync at
// any time. Stepped down later, it must not wait for the peer again.
func TestForcedAloneNotFromSynced(t *testing.T) {
	const e = 4<<8 | 1
	dir := t.TempDir()
	primWithMark(t, dir, e, cluster.Peer{Seen: true, Name: "nodeB", State: cluster.Second, Epoch: e})
	a, m := restarted(t, dir, "forever")
	alone, _ := cluster.Step(m, cluster.Event{Kind: cluster.EvCmdPrim})
	if alone.State != cluster.Alone {
		t.Fatalf("the test sees nothing: duet prim gives %s", alone.State)
	}
	if err := a.persist(alone); err != nil {
		t.Fatal(err)
	}
	down, _ := cluster.Step(alone, cluster.Event{Kind: cluster.EvIsolated})
	if err := a.persist(down); err != nil {
		t.Fatal(err)
	}
	a.machine.Store(&down)
	if serves, why := takesOver(t, a, down); !serves {
		t.Errorf("ALONE after duet prim, no peer in sync in its term, stepped down: takes nothing over again (%s)", why)
	}
}

// TestTakebackThenReceiverBackAloneWaits (from a review): failures in
// turn through a swap's take-back. nodeA (PRIM, nodeB in sync) runs `duet
// swap`; nodeB serves (PRIM, saved) and dies before nodeA heard it serve;
// nodeA, handed over, takes the role back (TestHandoverThenPeerLost),
// acknowledges writes ALONE and dies. nodeB alone comes back: its term,
// handed over by nodeA, never said "synced" (nodeA was WAIT), yet nodeA
// could take over after it: nodeB must wait.
func TestTakebackThenReceiverBackAloneWaits(t *testing.T) {
	const e = 4<<8 | 1
	dirA, dirB := t.TempDir(), t.TempDir()
	a, prim := primWithMark(t, dirA, e, cluster.Peer{Seen: true, Name: "nodeB", State: cluster.Second, Epoch: e})
	giver, _ := cluster.Step(prim, cluster.Event{Kind: cluster.EvCmdSwap})
	if giver.State != cluster.Wait || !giver.HandedOver {
		t.Fatalf("swap: %s handed over %v", giver.State, giver.HandedOver)
	}
	if err := a.persist(giver); err != nil {
		t.Fatal(err)
	}
	bNode := testNode(t, dirB)
	b := cluster.Machine{Name: "nodeB", ID: 2, State: cluster.Second, Epoch: e,
		Peer: cluster.Peer{Seen: true, Name: "nodeA", State: cluster.Prim, Epoch: e, Synced: true}}
	b, _ = cluster.Step(b, cluster.Event{Kind: cluster.EvPeer, Peer: cluster.Peer{Name: "nodeA", State: cluster.Wait, Epoch: e, Handover: true}})
	if b.State != cluster.Prim {
		t.Fatalf("the test sees nothing: nodeB does not take the handover (%s)", b.State)
	}
	if err := bNode.persist(b); err != nil {
		t.Fatal(err)
	}
	giver, _ = cluster.Step(giver, cluster.Event{Kind: cluster.EvPeerLost}) // checks begin
	a.vipProbe = func() (bool, string) { return true, "" }
	a.machine.Store(&giver)
	ok, why, held := a.takeoverChecks(context.Background())
	if back, _ := cluster.Step(giver, cluster.Event{Kind: cluster.EvChecked, OK: ok, Why: why, Held: held}); !back.State.Serving() {
		t.Fatalf("the test sees nothing: nodeA does not take the role back: %s", why)
	}
	n, m := restarted(t, dirB, "forever")
	if serves, _ := takesOver(t, n, m); serves {
		t.Fatal("nodeB, back alone after a term handed over by nodeA, serves although nodeA took the role back after it and acknowledged writes alone")
	}
}

// TestSecondStopSaysStop: a SECOND whose daemon stops (SIGTERM: systemctl
// stop, a reboot) saves and says STOP, stale, in its last heartbeats; the
// primary, hearing it before it loses the node, goes ALONE without
// re-arming its start wait, so that "stop the secondary, stop the
// primary, start the primary" serves (TestResyncResumesAfterCrash in the
// lab waited for ever without it).
func TestSecondStopSaysStop(t *testing.T) {
	const e = 4<<8 | 1
	b := loopNode(t)
	m := cluster.Machine{Name: "nodeB", ID: 2, State: cluster.Second, Epoch: e,
		Peer: cluster.Peer{Seen: true, Name: "nodeA", State: cluster.Prim, Epoch: e, Synced: true}}
	b.machine.Store(&m)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		b.loop(ctx, m)
	}()
	cancel()
	<-done
	got := b.machine.Load()
	if got.State != cluster.Stop || !got.Stale || !b.saidStop.Load() {
		t.Fatalf("a SECOND's daemon stopping publishes %s stale %v (said %v): want STOP, stale", got.State, got.Stale, b.saidStop.Load())
	}
	if r, err := b.loadMachine(); err != nil || !r.Stale {
		t.Fatalf("saved: stale %v (%v), want stale", r.Stale, err)
	}

	// nodeA hears it, then loses nodeB, then is stopped and started.
	dir := t.TempDir()
	a, prim := primWithMark(t, dir, e, cluster.Peer{Seen: true, Name: "nodeB", State: cluster.Second, Epoch: e})
	prim, _ = cluster.Step(prim, cluster.Event{Kind: cluster.EvPeer, Peer: cluster.Peer{Name: "nodeB", State: got.State, Epoch: got.Epoch, Stale: got.Stale}})
	alone, _ := cluster.Step(prim, cluster.Event{Kind: cluster.EvPeerLost})
	if alone.State != cluster.Alone {
		t.Fatalf("the test sees nothing: %s", alone.State)
	}
	if err := a.persist(alone); err != nil {
		t.Fatal(err)
	}
	a.leftAlone()
	if n, _ := restarted(t, dir, "forever"); n.startWait.Load() {
		t.Fatal("nodeA, whose secondary said it stopped, waits for it after a restart alone")
	}
}
