package cluster

import "testing"

// TestWaitNotStaleRetriesAfterVIPAnswered: a SECOND whose checks find
// the VIP answered becomes WAIT and stale ("the old primary may still be
// serving: from now on it may write what this copy lacks") and never
// tries again. A WAIT that is not stale (an old primary restarted:
// cluster.json said PRIM; a primary that stepped down isolated) only
// logged the failure and ran the checks again at the next tick, every
// quarter interval, for as long as it did not hear its peer (a firewall
// dropping the heartbeat port, a one-way cut: its new run's heartbeats
// echo nothing the peer can accept, so the peer never sees it either).
// The peer serving (it took over) answers the probe each time; the first
// probe that got no answer in 150 ms (the peer's host stalled, a VM
// paused for migration, a link flap) made this node take the VIP and
// serve the copy from before the peer's takeover: two primaries, and the
// peer's acknowledged writes missing here. A failure that finds nothing
// held (the witness unreachable) is still tried again.
func TestWaitNotStaleRetriesAfterVIPAnswered(t *testing.T) {
	const e = 6<<8 | 1
	m := Machine{Name: "nodeA", ID: 1, State: Wait, Epoch: e, Preferred: true} // restarted, cluster.json said PRIM
	m, acts := Step(m, Event{Kind: EvTick})
	if !has(acts, DoCheck) {
		t.Fatalf("no checks: %+v", acts)
	}
	m, _ = Step(m, Event{Kind: EvChecked, Held: true, Why: "VIP 10.0.0.10 is answered by 52:54:00:00:00:02: the old primary is alive (a network split?) or another host uses the address"})
	var all []Action
	for i := 0; i < 3 && !m.State.Serving(); i++ {
		m, acts = Step(m, Event{Kind: EvTick})
		all = append(all, acts...)
		if has(acts, DoCheck) {
			m, acts = Step(m, Event{Kind: EvChecked, OK: true}) // one probe unanswered
			all = append(all, acts...)
		}
	}
	if has(all, DoServe) {
		t.Fatalf("a WAIT copy whose checks found the VIP held by another host checked again and served (%s, epoch %d): "+
			"whoever holds the VIP serves and writes what this copy lacks", m.State, m.Epoch)
	}
}

func TestWaitRetriesAfterWitnessUnreachable(t *testing.T) {
	m := Machine{Name: "nodeA", ID: 1, State: Wait, Epoch: 6<<8 | 1, Preferred: true}
	m, _ = Step(m, Event{Kind: EvTick})
	m, _ = Step(m, Event{Kind: EvChecked, Why: "witness unreachable"})
	if m.Stale {
		t.Fatal("a WAIT copy whose witness did not answer counts as stale")
	}
	m, acts := Step(m, Event{Kind: EvTick})
	if !has(acts, DoCheck) {
		t.Fatal("a WAIT copy whose witness did not answer does not check again")
	}
	if m, _ = Step(m, Event{Kind: EvChecked, OK: true}); !m.State.Serving() {
		t.Fatalf("checks passed at last: %s", m.State)
	}
}
