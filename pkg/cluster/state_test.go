package cluster

import (
	"fmt"
	"strings"
	"testing"
	"time"
)

func has(acts []Action, d Do) bool {
	for _, a := range acts {
		if a.Do == d {
			return true
		}
	}
	return false
}

func peerEv(p Peer) Event { p.Seen = true; return Event{Kind: EvPeer, Peer: p} }

// ep is the epoch that node id draws with counter c.
func ep(c uint64, id uint8) uint64 { return c<<8 | uint64(id) }

// allMachines enumerates machines and events over every state, epoch
// relation, staleness, preference and peer view.
func allMachines() []Machine {
	var out []Machine
	for s := Stop; s <= Alone; s++ {
		for _, stale := range []bool{false, true} {
			for _, pref := range []bool{false, true} {
				for _, ho := range []bool{false, true} {
					// Unreachable: a SECOND is in sync and has not handed
					// over; a serving node has not handed over.
					if s == Second && (stale || ho) || s.Serving() && ho {
						continue
					}
					for _, seen := range []bool{false, true} {
						for ps := Stop; ps <= Alone; ps++ {
							for _, pe := range []uint64{4, 5, 6} {
								for _, rs := range []string{"", "data"} {
									for _, cont := range []bool{false, true} {
										for _, held := range []bool{false, true} {
											// Only a serving node has a term the peer
											// knew; only a stale WAIT or STOP one was
											// made stale by a held role.
											if cont && !s.Serving() || held && (!stale || ho || s != Wait && s != Stop) {
												continue
											}
											m := Machine{Name: "nodeA", ID: 1, State: s, Epoch: 5, Stale: stale, Preferred: pref, HandedOver: ho, Resyncing: rs, Shared: cont, StaleHeld: held,
												Peer: Peer{Seen: seen, Name: "nodeB", State: ps, Epoch: pe, Preferred: !pref}}
											out = append(out, m)
											if s.Serving() && !cont && !held {
												m.ServiceDown = "web: exited 1" // kept the role with a failed service
												out = append(out, m)
											}
										}
									}
								}
							}
						}
					}
				}
			}
		}
	}
	return out
}

func allEvents() []Event {
	var evs []Event
	for ps := Stop; ps <= Alone; ps++ {
		for _, pe := range []uint64{4, 5, 6} {
			for _, f := range []Peer{{}, {Stale: true}, {Synced: true}, {Handover: true}, {Preferred: true}, {Shared: true}, {Shared: true, Synced: true}, {Stale: true, StaleHeld: true}, {Synced: true, ServiceFailed: true},
				{Yields: true}, {Yields: true, Stale: true, StaleHeld: true}, {Yields: true, Shared: true}, {Yields: true, Stale: true}} {
				p := f
				p.Name, p.State, p.Epoch = "nodeB", ps, pe
				evs = append(evs, peerEv(p))
			}
		}
	}
	for _, k := range []Kind{EvPeerLost, EvTick, EvIsolated, EvCmdStart, EvCmdStop, EvCmdSecond, EvCmdSwap} {
		evs = append(evs, Event{Kind: k})
	}
	return append(evs, Event{Kind: EvChecked, OK: true}, Event{Kind: EvChecked, Why: "witness unreachable"},
		Event{Kind: EvCmdPrim}, Event{Kind: EvCmdPrim, Force: true}, Event{Kind: EvServiceDown, Why: "web"}, Event{Kind: EvServeFailed, Why: "VIP in use"},
		Event{Kind: EvDiskFailed, Why: "fsync: input/output error"})
}

// TestInvariants checks every (machine, event) pair against the rules of
// DESIGN.md.
func TestInvariants(t *testing.T) {
	n := 0
	for _, m := range allMachines() {
		for _, ev := range allEvents() {
			n++
			got, acts := Step(m, ev)
			became := got.State.Serving() && !m.State.Serving()
			// Never serve while seeing a serving peer.
			if got.State.Serving() && got.Peer.Seen && got.Peer.State.Serving() && !m.State.Serving() {
				t.Errorf("%+v + %+v: serving next to serving peer", m, ev)
			}
			// A stale copy is promoted only by a forced command.
			if became && m.Stale && !(ev.Kind == EvCmdPrim && ev.Force) {
				t.Errorf("%+v + %+v: stale copy promoted", m, ev)
			}
			// A copy mid-resync is promoted only by a forced command.
			if became && m.Resyncing != "" && !(ev.Kind == EvCmdPrim && ev.Force) {
				t.Errorf("%+v + %+v: copy mid-resync promoted", m, ev)
			}
			// A promotion draws an epoch past both copies', of this node.
			if became && (got.Epoch <= m.Epoch || got.Epoch <= got.Peer.Epoch || got.Epoch&0xff != uint64(m.ID)) {
				t.Errorf("%+v + %+v: promoted without a new epoch of its own (%d)", m, ev, got.Epoch)
			}
			// A serving node next to a serving peer with a newer epoch
			// steps down; next to an older one it stays.
			if m.State.Serving() && ev.Kind == EvPeer && ev.Peer.State.Serving() {
				if ev.Peer.Epoch > m.Epoch && (got.State != Wait || !got.Stale) {
					t.Errorf("%+v + %+v: stayed %s (stale %v) next to a serving peer with a newer epoch", m, ev, got.State, got.Stale)
				}
				if ev.Peer.Epoch < m.Epoch && !got.State.Serving() {
					t.Errorf("%+v + %+v: stepped down for a serving peer with an older epoch", m, ev)
				}
			}
			// A node that carries its term on alone steps down for a
			// WAIT peer whose copy is newer and not stale (it took the
			// role over meanwhile: TestResumedPrimaryServesOverNewerPeer);
			// one serving in a takeover's term does not.
			if m.State.Serving() && ev.Kind == EvPeer && (ev.Peer.State == Wait || ev.Peer.State == Stop) {
				newer := ev.Peer.Yields && (!ev.Peer.Stale || ev.Peer.StaleHeld) && !ev.Peer.Handover && ev.Peer.Epoch > m.Epoch
				if m.Shared && newer && (got.State != Wait || !got.Stale) {
					t.Errorf("%+v + %+v: carried its term on over a WAIT peer with a newer copy (%s, stale %v)", m, ev, got.State, got.Stale)
				}
				if !(m.Shared && newer) && !got.State.Serving() {
					t.Errorf("%+v + %+v: stepped down for a %s peer", m, ev, ev.Peer.State)
				}
			}
			// A copy that does not serve turns stale on hearing a serving
			// peer, unless that peer steps down for it (YieldsTo).
			if !m.State.Serving() && m.State != Second && ev.Kind == EvPeer && ev.Peer.State.Serving() && !got.State.Serving() {
				if y := ev.Peer.YieldsTo(m); y && (got.Stale != m.Stale || got.StaleHeld != m.StaleHeld) || !y && (!got.Stale || got.StaleHeld) && got.State != Second {
					t.Errorf("%+v + %+v: stale %v (held %v) -> %v (held %v) (the peer steps down for it: %v)", m, ev, m.Stale, m.StaleHeld, got.Stale, got.StaleHeld, y)
				}
			}
			// Stale only by a held role: never without Stale, and left
			// only on hearing the peer (or for good, or forced).
			if got.StaleHeld && (!got.Stale || !m.StaleHeld && !(ev.Kind == EvChecked && ev.Held)) {
				t.Errorf("%+v + %+v: stale held %v (stale %v) from stale held %v", m, ev, got.StaleHeld, got.Stale, m.StaleHeld)
			}
			if m.StaleHeld && !got.Stale && !got.State.Serving() && ev.Kind != EvPeer {
				t.Errorf("%+v + %+v: stale by a held role, cleared without hearing the peer", m, ev)
			}
			if m.StaleHeld && !got.Stale && got.State != Second && ev.Kind == EvPeer && !(ev.Peer.State == Wait && ev.Peer.Stale && !ev.Peer.StaleHeld && ev.Peer.Epoch < m.Epoch) {
				t.Errorf("%+v + %+v: stale by a held role, cleared by a peer that does not defer", m, ev)
			}
			// A failed service does not send the role to a peer that
			// gave it up for a failed service.
			if ev.Kind == EvServiceDown {
				failed := m
				failed.Peer.ServiceFailed = true
				if got, _ := Step(failed, ev); failed.State.Serving() && !got.State.Serving() {
					t.Errorf("%+v + %+v: handed the role to a peer whose service failed", failed, ev)
				}
			}
			// Serving starts and stops only through the actions.
			if became != has(acts, DoServe) {
				t.Errorf("%+v + %+v: became serving=%v but DoServe=%v", m, ev, became, has(acts, DoServe))
			}
			left := m.State.Serving() && !got.State.Serving()
			if left != has(acts, DoUnserve) {
				t.Errorf("%+v + %+v: left serving=%v but DoUnserve=%v", m, ev, left, has(acts, DoUnserve))
			}
			// A state change is persisted.
			if got.State != m.State && !has(acts, DoPersist) {
				t.Errorf("%+v + %+v: %s -> %s not persisted", m, ev, m.State, got.State)
			}
			// Stopped nodes move only on start.
			if m.State == Stop && got.State != Stop && ev.Kind != EvCmdStart {
				t.Errorf("%+v + %+v: left STOP", m, ev)
			}
			// A handed-over node claims nothing, the peer up or lost
			// (it may have served: TestHandoverThenPeerLost), unless
			// the peer came back WAIT with a stale copy and no newer
			// epoch (it restarted before taking over: it never will),
			// or STOP with no newer epoch (stopped by the operator
			// before it took over: TestSwapTargetStoppedGiverServesAgain),
			// or the operator forces it.
			heard := m
			heard.Peer, heard.Peer.Seen = ev.Peer, true
			receiverBack := ev.Kind == EvPeer && ev.Peer.Epoch <= m.Epoch && (ev.Peer.State == Wait && heard.wins() || ev.Peer.State == Stop)
			forced := ev.Kind == EvCmdPrim && ev.Force
			if m.HandedOver && became && !forced && !receiverBack {
				t.Errorf("%+v + %+v: handed over, then took the role back", m, ev)
			}
			// It is saved: a restart must know it (and that it ended).
			if got.HandedOver != m.HandedOver && !has(acts, DoPersist) {
				t.Errorf("%+v + %+v: handed over %v -> %v not persisted", m, ev, m.HandedOver, got.HandedOver)
			}
		}
	}
	t.Logf("%d (machine, event) pairs checked", n)
}

// run feeds events in turn.
func run(m Machine, evs ...Event) (Machine, []Action) {
	var all []Action
	for _, ev := range evs {
		var acts []Action
		m, acts = Step(m, ev)
		all = append(all, acts...)
	}
	return m, all
}

func TestScenarios(t *testing.T) {
	a := Machine{Name: "nodeA", ID: 1, State: Wait, Preferred: true}
	b := Machine{Name: "nodeB", ID: 2, State: Wait, Stale: true}
	peerOf := func(m Machine, synced bool) Peer {
		return Peer{Name: m.Name, State: m.State, Epoch: m.Epoch, Stale: m.Stale, Preferred: m.Preferred, Synced: synced, Handover: m.HandedOver, Shared: m.Shared, StaleHeld: m.StaleHeld, Yields: true}
	}

	// Fresh cluster: the preferred node serves, the other syncs.
	a, _ = Step(a, peerEv(peerOf(b, false)))
	if a.State != Prim || a.Epoch != ep(2, 1) {
		t.Fatalf("fresh start: nodeA %s epoch %d, want PRIM %d", a.State, a.Epoch, ep(2, 1))
	}
	b, _ = Step(b, peerEv(peerOf(a, false)))
	if b.State != Wait {
		t.Fatalf("nodeB %s while resyncing, want WAIT", b.State)
	}
	b, _ = Step(b, peerEv(peerOf(a, true)))
	if b.State != Second || b.Epoch != ep(2, 1) || b.Stale {
		t.Fatalf("nodeB after sync: %+v", b)
	}
	a, _ = Step(a, peerEv(peerOf(b, false)))

	// Failover: nodeA dies; nodeB checks, then serves with a new epoch.
	b2, acts := Step(b, Event{Kind: EvPeerLost})
	if !has(acts, DoCheck) || b2.State != Second {
		t.Fatalf("peer lost: %+v %+v", b2, acts)
	}
	b2, _ = Step(b2, Event{Kind: EvChecked, OK: true})
	if b2.State != Alone || b2.Epoch != ep(4, 2) {
		t.Fatalf("after checks: %s epoch %d, want ALONE %d", b2.State, b2.Epoch, ep(4, 2))
	}
	// Failed checks (old primary still answers for the VIP): stay out.
	b3, _ := run(b, Event{Kind: EvPeerLost}, Event{Kind: EvChecked, Why: "VIP answered"})
	if b3.State != Wait || !b3.Stale {
		t.Fatalf("failed checks: %+v", b3)
	}
	// The old primary returns (restarted, its old epoch) and must not serve.
	a2 := Machine{Name: "nodeA", ID: 1, State: Wait, Epoch: ep(2, 1), Preferred: true}
	a2, _ = Step(a2, peerEv(peerOf(b2, false)))
	if a2.State != Wait {
		t.Fatalf("old primary next to ALONE peer: %s", a2.State)
	}
	b2, _ = Step(b2, peerEv(peerOf(a2, false)))
	if b2.State != Prim {
		t.Fatalf("ALONE with peer back: %s", b2.State)
	}
	a2, _ = Step(a2, peerEv(peerOf(b2, true)))
	if a2.State != Second || a2.Epoch != ep(4, 2) {
		t.Fatalf("old primary after resync: %+v", a2)
	}

	// Swap: only with a peer in sync; the peer serves on the handover.
	b2, _ = Step(b2, peerEv(peerOf(a2, false)))
	b4, acts := Step(b2, Event{Kind: EvCmdSwap})
	if b4.State != Wait || !b4.HandedOver || !has(acts, DoUnserve) {
		t.Fatalf("swap: %+v %+v", b4, acts)
	}
	a3, _ := Step(a2, peerEv(peerOf(b4, false)))
	if a3.State != Prim || a3.Epoch != ep(6, 1) {
		t.Fatalf("handover: %+v", a3)
	}
	b4, _ = Step(b4, peerEv(peerOf(a3, false)))
	if b4.State != Wait || b4.HandedOver {
		t.Fatalf("after handover: %+v", b4)
	}
	_, acts = Step(Machine{Name: "nodeA", ID: 1, State: Prim, Epoch: ep(6, 1), Peer: Peer{Seen: true, State: Wait, Epoch: ep(4, 2)}}, Event{Kind: EvCmdSwap})
	if !has(acts, DoRefuse) {
		t.Fatalf("swap to a peer not in sync was not refused: %+v", acts)
	}

	// A restarted secondary is stale: it never serves alone unless
	// forced. (Its epoch 2 is of an older version: a plain counter.)
	s := Machine{Name: "nodeB", ID: 2, State: Wait, Epoch: 2, Stale: true}
	s, acts = run(s, Event{Kind: EvTick}, Event{Kind: EvPeerLost}, Event{Kind: EvCmdPrim})
	if s.State != Wait || !has(acts, DoRefuse) {
		t.Fatalf("stale node: %+v", s)
	}
	for _, a := range acts {
		if a.Do == DoRefuse && !strings.Contains(a.Msg, "--force") {
			t.Errorf("refusal does not name --force: %q", a.Msg)
		}
	}
	s, _ = Step(s, Event{Kind: EvCmdPrim, Force: true})
	if s.State != Alone || s.Epoch != ep(2, 2) {
		t.Fatalf("forced: %+v", s)
	}

	// Split brain healed, both at the same epoch (only from a peer of an
	// older version): the same node steps down on both sides.
	x := Machine{Name: "nodeA", ID: 1, State: Alone, Epoch: 3, Preferred: true}
	y := Machine{Name: "nodeB", ID: 2, State: Alone, Epoch: 3}
	x2, _ := Step(x, peerEv(peerOf(y, false)))
	y2, _ := Step(y, peerEv(peerOf(x, false)))
	if !x2.State.Serving() || y2.State != Wait || !y2.Stale {
		t.Fatalf("split brain: nodeA %s, nodeB %s stale=%v", x2.State, y2.State, y2.Stale)
	}

	// Isolation: a primary that loses peer and witness steps down.
	z, acts := run(Machine{Name: "nodeA", ID: 1, State: Prim, Epoch: ep(6, 1), Peer: Peer{Seen: true, State: Second, Epoch: ep(6, 1)}},
		Event{Kind: EvPeerLost}, Event{Kind: EvIsolated})
	if z.State != Wait || z.Stale || !has(acts, DoUnserve) {
		t.Fatalf("isolated: %+v", z)
	}
}

func TestHeartbeatRoundTrip(t *testing.T) {
	key := []byte("0123456789abcdef")
	h := Heartbeat{Name: "nodeA", State: Prim, Epoch: 7, Preferred: true, Synced: true, Boot: 99, Seq: 3,
		Time: 5 * time.Hour, EchoBoot: 42, EchoTime: 7 * time.Minute}
	b := h.Marshal(key)
	got, err := ParseHeartbeat(b, key)
	if err != nil || got != h {
		t.Fatalf("round trip: %+v, %v", got, err)
	}
	for _, f := range []Heartbeat{{Stale: true}, {Handover: true}, {Shared: true}, {Synced: true, Shared: true}, {Stale: true, StaleHeld: true}, {ServiceFailed: true}, {Yields: true}} {
		f.Name, f.State, f.Epoch = "nodeA", Alone, 9
		if got, err := ParseHeartbeat(f.Marshal(key), key); err != nil || got != f || got.Peer().Shared != f.Shared || got.Peer().StaleHeld != f.StaleHeld || got.Peer().ServiceFailed != f.ServiceFailed || got.Peer().Yields != f.Yields {
			t.Errorf("flags %+v: round trip %+v, %v", f, got, err)
		}
	}
	if _, err := ParseHeartbeat(b, []byte("another key of 16")); err != ErrHeartbeatAuth {
		t.Errorf("wrong key: %v", err)
	}
	for i := range b {
		c := append([]byte(nil), b...)
		c[i] ^= 0x40
		if _, err := ParseHeartbeat(c, key); err == nil {
			t.Errorf("byte %d flipped: accepted", i)
		}
	}
	for n := 0; n < len(b); n++ {
		if _, err := ParseHeartbeat(b[:n], key); err == nil {
			t.Errorf("truncated to %d bytes: accepted", n)
		}
	}
	v1 := append([]byte(nil), b...)
	v1[4] = 1
	if _, err := ParseHeartbeat(v1[:48], key); err == nil || !strings.Contains(err.Error(), "version 1: this duet speaks 2") {
		t.Errorf("a version 1 heartbeat: %v, want an error naming both versions", err)
	}
}

func FuzzParseHeartbeat(f *testing.F) {
	key := []byte("0123456789abcdef")
	h := Heartbeat{Name: "nodeA", State: Second, Epoch: 1, Boot: 1, Seq: 1}
	f.Add(h.Marshal(key))
	f.Add([]byte("DUHB"))
	f.Fuzz(func(t *testing.T, b []byte) {
		got, err := ParseHeartbeat(b, key)
		if err != nil {
			return
		}
		again, err := ParseHeartbeat(got.Marshal(key), key)
		if err != nil || again != got {
			t.Fatalf("accepted heartbeat does not round-trip: %+v %v", got, err)
		}
	})
}

// TestNewerServingPeerWins: a serving node that hears a serving peer with a
// newer epoch steps down at once, whatever its preference or name; one
// that hears an older epoch stays (the peer steps down).
func TestNewerServingPeerWins(t *testing.T) {
	const e = 3<<8 | 1
	for _, s := range []State{Prim, Alone} {
		for _, ps := range []State{Prim, Alone} {
			for _, pref := range []bool{false, true} {
				for _, name := range []string{"nodeA", "nodeC"} {
					m := Machine{Name: "nodeB", ID: 1, State: s, Epoch: e, Preferred: pref}
					for _, tc := range []struct {
						peerEpoch uint64
						stepDown  bool
					}{{4<<8 | 2, true}, {e + 1, true}, {2<<8 | 2, false}, {e - 1, false}} {
						got, acts := Step(m, peerEv(Peer{Name: name, State: ps, Epoch: tc.peerEpoch, Preferred: !pref}))
						desc := fmt.Sprintf("%s epoch %d preferred=%v hears %s %s epoch %d", s, e, pref, name, ps, tc.peerEpoch)
						if tc.stepDown && (got.State != Wait || !got.Stale || !has(acts, DoUnserve) || !has(acts, DoPersist)) {
							t.Errorf("%s: %s stale=%v %+v, want WAIT stale after DoUnserve", desc, got.State, got.Stale, acts)
						}
						if !tc.stepDown && (got.State != s || has(acts, DoUnserve)) {
							t.Errorf("%s: %s %+v, want it to stay %s", desc, got.State, acts, s)
						}
					}
				}
			}
		}
	}
	// Both sides of a split agree: exactly one steps down, also at equal
	// epochs (a peer of an older version).
	for _, ex := range []uint64{ep(3, 1), ep(4, 1), 7} {
		for _, pref := range []bool{false, true} {
			x := Machine{Name: "nodeA", ID: 1, State: Alone, Epoch: ex, Preferred: pref}
			y := Machine{Name: "nodeB", ID: 2, State: Alone, Epoch: 7, Preferred: !pref}
			if ex != 7 {
				y.Epoch = ep(3, 2)
			}
			x2, _ := Step(x, peerEv(Peer{Name: y.Name, State: y.State, Epoch: y.Epoch, Preferred: y.Preferred}))
			y2, _ := Step(y, peerEv(Peer{Name: x.Name, State: x.State, Epoch: x.Epoch, Preferred: x.Preferred}))
			if x2.State.Serving() == y2.State.Serving() {
				t.Errorf("epochs %d and %d, nodeA preferred=%v: nodeA %s, nodeB %s: want exactly one serving", x.Epoch, y.Epoch, pref, x2.State, y2.State)
			}
		}
	}
}

// TestEpochsUnique: two nodes that take over independently from the same
// epoch draw different epochs, both newer than it, also from an epoch of an
// older version.
func TestEpochsUnique(t *testing.T) {
	for _, from := range []uint64{6, ep(6, 1), ep(6, 2)} {
		a := Machine{Name: "nodeA", ID: 1, State: Second, Epoch: from, Peer: Peer{Seen: true, Name: "nodeB", State: Prim, Epoch: from}}
		b := Machine{Name: "nodeB", ID: 2, State: Second, Epoch: from, Peer: Peer{Seen: true, Name: "nodeA", State: Prim, Epoch: from}}
		a, _ = run(a, Event{Kind: EvPeerLost}, Event{Kind: EvChecked, OK: true})
		b, _ = run(b, Event{Kind: EvPeerLost}, Event{Kind: EvChecked, OK: true})
		if !a.State.Serving() || !b.State.Serving() {
			t.Fatalf("from %d: nodeA %s, nodeB %s: both should have taken over", from, a.State, b.State)
		}
		if a.Epoch == b.Epoch || a.Epoch <= from || b.Epoch <= from {
			t.Errorf("both took over from epoch %d: nodeA drew %d, nodeB %d; want two different epochs above it", from, a.Epoch, b.Epoch)
		}
		// A primary that loses its secondary draws too, while the
		// secondary takes over (a network split): a different epoch, and
		// the node that took over holds the newer one, whichever its ID.
		for _, id := range []uint8{1, 2} {
			old := Machine{Name: "nodeA", ID: id, State: Prim, Epoch: from, Peer: Peer{Seen: true, Name: "nodeB", State: Second, Epoch: from}}
			old, _ = Step(old, Event{Kind: EvPeerLost})
			taker := Machine{Name: "nodeB", ID: 3 - id, State: Second, Epoch: from, Peer: Peer{Seen: true, Name: "nodeA", State: Prim, Epoch: from}}
			taker, _ = run(taker, Event{Kind: EvPeerLost}, Event{Kind: EvChecked, OK: true})
			if old.State != Alone || !taker.State.Serving() || old.Epoch <= from || old.Epoch >= taker.Epoch {
				t.Errorf("from %d: the old primary (ID %d) went %s at epoch %d, the node that took over %s at %d: want both serving, the taker newer",
					from, id, old.State, old.Epoch, taker.State, taker.Epoch)
			}
		}
	}
}

// TestResyncingCopyDoesNotServe: a copy that a resync is rewriting never
// takes over, not even from a SECOND whose peer is lost or hands over,
// unless forced.
func TestResyncingCopyDoesNotServe(t *testing.T) {
	const e = 2<<8 | 2
	second := Machine{Name: "nodeB", ID: 2, State: Second, Epoch: e, Resyncing: "data",
		Peer: Peer{Seen: true, Name: "nodeA", State: Prim, Epoch: e, Synced: true}}
	wait := second
	wait.State = Wait
	for _, tc := range []struct {
		name string
		m    Machine
		evs  []Event
	}{
		{"SECOND, peer lost, checks pass", second, []Event{{Kind: EvPeerLost}, {Kind: EvTick}, {Kind: EvChecked, OK: true}}},
		{"SECOND, peer hands over", second, []Event{peerEv(Peer{Name: "nodeA", State: Wait, Epoch: e, Handover: true})}},
		{"SECOND, peer stopped", second, []Event{peerEv(Peer{Name: "nodeA", State: Stop, Epoch: e})}},
		{"WAIT, peer stopped", wait, []Event{peerEv(Peer{Name: "nodeA", State: Stop, Epoch: e})}},
		{"WAIT, peer lost, checks pass", wait, []Event{{Kind: EvPeerLost}, {Kind: EvTick}, {Kind: EvChecked, OK: true}}},
		{"WAIT, peer says synced", wait, []Event{peerEv(Peer{Name: "nodeA", State: Prim, Epoch: e, Synced: true})}},
		{"WAIT, duet prim", wait, []Event{{Kind: EvPeerLost}, {Kind: EvCmdPrim}}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, acts := run(tc.m, tc.evs...)
			if got.State != Wait || !got.Stale || has(acts, DoServe) || has(acts, DoCheck) {
				t.Fatalf("%s stale=%v, actions %+v: want WAIT stale, no checks, no serving", got.State, got.Stale, acts)
			}
			if !has(acts, DoPersist) {
				t.Errorf("staleness not persisted: %+v", acts)
			}
			for _, a := range acts {
				if (a.Do == DoLog || a.Do == DoRefuse) && strings.Contains(a.Msg, "directory data: this copy is mid-resync") {
					return
				}
			}
			t.Errorf("no message names the directory mid-resync: %+v", acts)
		})
	}
	got, _ := run(wait, Event{Kind: EvPeerLost}, Event{Kind: EvCmdPrim, Force: true})
	if got.State != Alone {
		t.Errorf("duet prim --force on a copy mid-resync: %s, want ALONE", got.State)
	}
	// Once the resync completed, the serving peer's word makes it SECOND.
	done, _ := Step(wait, peerEv(Peer{Name: "nodeA", State: Prim, Epoch: e, Synced: true}))
	done.Resyncing = ""
	done, _ = Step(done, peerEv(Peer{Name: "nodeA", State: Prim, Epoch: e, Synced: true}))
	if done.State != Second || done.Stale {
		t.Errorf("after the resync: %s stale=%v, want SECOND", done.State, done.Stale)
	}
}

// A secondary stopped by the operator while its peer serves marks its copy
// stale (and one stopped before hears the serving peer and does): the
// primary releases what it cannot ship to it, so after `duet start` and a
// lost primary it must not take over on its own with a copy that lacks it.
func TestStoppedSecondaryIsStale(t *testing.T) {
	const e = 5<<8 | 1
	prim := Peer{Name: "nodeA", State: Prim, Epoch: e, Synced: true}
	for _, stopFirst := range []bool{false, true} {
		b := Machine{Name: "nodeB", ID: 2, State: Second, Epoch: e}
		if !stopFirst {
			b, _ = Step(b, peerEv(prim))
		}
		b, _ = Step(b, Event{Kind: EvCmdStop})
		if stopFirst {
			b, _ = Step(b, peerEv(Peer{Name: "nodeA", State: Prim, Epoch: e}))
		}
		if !b.Stale {
			t.Fatalf("stopFirst=%v: a stopped copy whose peer serves is not stale: the primary cannot release safely", stopFirst)
		}
		b, _ = Step(b, Event{Kind: EvPeerLost})
		b, _ = Step(b, Event{Kind: EvCmdStart})
		b, acts := Step(b, Event{Kind: EvTick})
		b, more := Step(b, Event{Kind: EvChecked, OK: true})
		if has(append(acts, more...), DoServe) {
			t.Fatalf("stopFirst=%v: took over (%s) with a copy that lacks what the primary released", stopFirst, b.State)
		}
	}
}

// TestNoSecondToAlone: an ALONE primary releases durability calls without
// its peer (it does not hear it), whatever its heartbeats say of the
// stream. A peer that still hears it must stay stale: turned SECOND on an
// ALONE heartbeat saying "synced" (its data connection works while its
// heartbeats to the primary are lost), it would take over without the
// writes released meanwhile when the primary dies.
func TestNoSecondToAlone(t *testing.T) {
	alone := Peer{Name: "nodeA", State: Alone, Epoch: ep(3, 1), Synced: true}
	for _, m := range []Machine{
		{Name: "nodeB", ID: 2, State: Wait, Epoch: ep(2, 1), Stale: true},
		{Name: "nodeB", ID: 2, State: Second, Epoch: ep(3, 1)},
	} {
		got, _ := Step(m, peerEv(alone))
		if got.State == Second || !got.Stale {
			t.Errorf("%s (stale %v) hearing ALONE synced: %s, stale %v; want WAIT, stale", m.State, m.Stale, got.State, got.Stale)
		}
	}
	// Once the primary hears it again (PRIM), "synced" counts.
	prim := alone
	prim.State = Prim
	if got, _ := Step(Machine{Name: "nodeB", ID: 2, State: Wait, Epoch: ep(2, 1), Stale: true}, peerEv(prim)); got.State != Second {
		t.Errorf("WAIT hearing PRIM synced: %s, want SECOND", got.State)
	}
}

// TestSwapReceiverRestarted: the node a swap handed the role to had its
// daemon restarted before it took over, within cluster.timeout (never
// declared lost). It comes back WAIT with a stale copy and will never
// serve; the giver, waiting for it to serve, claimed nothing either:
// nothing served until an operator ran duet prim (found by make nemesis,
// kill-during-swap). The giver serves again; not when the peer drew a
// newer epoch (it served meanwhile) or is not stale.
func TestSwapReceiverRestarted(t *testing.T) {
	giver := Machine{Name: "nodeB", ID: 2, State: Wait, Epoch: 8194, HandedOver: true,
		Peer: Peer{Seen: true, Name: "nodeA", State: Second, Epoch: 8194}}
	back := Peer{Seen: true, Name: "nodeA", State: Wait, Epoch: 8194, Stale: true}
	got, _ := Step(giver, Event{Kind: EvPeer, Peer: back})
	if !got.State.Serving() || got.HandedOver {
		t.Errorf("the receiver back WAIT and stale before taking over: giver %s (handed over %v), want serving", got.State, got.HandedOver)
	}
	newer := back
	newer.Epoch = 9000
	if got, _ := Step(giver, Event{Kind: EvPeer, Peer: newer}); got.State.Serving() {
		t.Error("the receiver back with a newer epoch (it served meanwhile): the giver serves")
	}
	fresh := back
	fresh.Stale = false
	if got, _ := Step(giver, Event{Kind: EvPeer, Peer: fresh}); got.State.Serving() {
		t.Error("the receiver WAIT with a copy that is not stale and the same epoch, preferred by name (it will serve): the giver serves")
	}
	// It refused the handover (its epoch differed): WAIT, not stale, an
	// older epoch. It will not serve (the giver's copy wins), so the
	// giver must.
	refused := fresh
	refused.Epoch = 8194 - 256
	if got, _ := Step(giver, Event{Kind: EvPeer, Peer: refused}); !got.State.Serving() {
		t.Error("the receiver WAIT with an older epoch (it refused the handover): the giver does not serve, and neither will it")
	}
}

// TestHandoverThenPeerLost: a node that handed the role over and then
// lost the receiver, heard in this run and never heard serving, takes the
// role back after its checks (the receiver could not release a call this
// copy lacks but across a cut, which the checks guard); one that
// restarted and has not heard the receiver since claims nothing (it was
// down: the receiver may have served alone), nor on a plain duet prim or
// duet start. It serves again when the receiver comes back without having
// served, or when forced; a receiver heard with a newer epoch served.
func TestHandoverThenPeerLost(t *testing.T) {
	giver := Machine{Name: "nodeA", ID: 1, State: Wait, Epoch: ep(5, 1), HandedOver: true,
		Peer: Peer{Seen: true, Name: "nodeB", State: Second, Epoch: ep(5, 1)}}
	lost, acts := Step(giver, Event{Kind: EvPeerLost})
	if lost.HandedOver || lost.Stale || !has(acts, DoPersist) {
		t.Fatalf("the receiver lost: handed over %v, stale %v, persisted %v", lost.HandedOver, lost.Stale, has(acts, DoPersist))
	}
	if got, _ := run(lost, Event{Kind: EvTick}, Event{Kind: EvChecked, OK: true}); !got.State.Serving() {
		t.Errorf("the receiver lost, checks passed: %s, want serving", got.State)
	}
	served := giver
	served.Peer.Epoch = ep(7, 2)
	if got, _ := Step(served, Event{Kind: EvPeerLost}); !got.Stale {
		t.Error("the receiver, heard with a newer epoch, lost: this copy is not stale")
	}

	// Restarted: cluster.json said WAIT, handed over; the peer not heard.
	m := Machine{Name: "nodeA", ID: 1, State: Wait, Epoch: ep(5, 1), HandedOver: true}
	m, acts = run(m, Event{Kind: EvPeerLost}, Event{Kind: EvTick}, Event{Kind: EvChecked, OK: true}, Event{Kind: EvTick})
	if m.State.Serving() || has(acts, DoCheck) || !m.HandedOver {
		t.Fatalf("restarted after handing over, the receiver not heard: %s, checks %v, handed over %v; want WAIT, no checks, still handed over", m.State, has(acts, DoCheck), m.HandedOver)
	}
	if _, acts := Step(m, Event{Kind: EvCmdPrim}); !has(acts, DoRefuse) {
		t.Errorf("duet prim on a node that handed the role over and has not heard the receiver since: not refused (%v)", acts)
	}
	if got, _ := Step(m, Event{Kind: EvCmdPrim, Force: true}); !got.State.Serving() || got.HandedOver {
		t.Errorf("duet prim --force: %s (handed over %v), want serving", got.State, got.HandedOver)
	}
	// Stopped and started by the operator meanwhile: still handed over.
	stopped, _ := Step(m, Event{Kind: EvCmdStop})
	started, _ := Step(stopped, Event{Kind: EvCmdStart})
	if started, acts := run(started, Event{Kind: EvTick}); !started.HandedOver || has(acts, DoCheck) {
		t.Errorf("stopped and started again: handed over %v, checks %v", started.HandedOver, has(acts, DoCheck))
	}
	// The receiver back, having served (a newer epoch): this copy is stale.
	prim := Peer{Name: "nodeB", State: Prim, Epoch: ep(7, 2)}
	if got, acts := Step(m, Event{Kind: EvPeer, Peer: prim}); got.State.Serving() || !got.Stale || got.HandedOver || !has(acts, DoPersist) {
		t.Errorf("the receiver back serving: %s stale %v handed over %v, persisted %v", got.State, got.Stale, got.HandedOver, has(acts, DoPersist))
	}
	// The receiver back WAIT, stale, no newer epoch: it never served.
	back := Peer{Name: "nodeB", State: Wait, Epoch: ep(5, 1), Stale: true}
	if got, _ := Step(m, Event{Kind: EvPeer, Peer: back}); !got.State.Serving() {
		t.Errorf("the receiver back WAIT and stale with the same epoch: giver %s, want serving", got.State)
	}
}

// TestStoppedNewerPeerNotServedOver: a WAIT node next to a stopped peer
// whose copy is newer (it served after this node's term: a higher epoch,
// not stale) does not serve its own older copy: the peer's writes would
// be set aside. An older or stale stopped peer is served over, as before.
func TestStoppedNewerPeerNotServedOver(t *testing.T) {
	const e = 4<<8 | 1
	wait := Machine{Name: "nodeA", ID: 1, State: Wait, Epoch: e}
	newer := Peer{Name: "nodeB", State: Stop, Epoch: e + 3<<8}
	got, acts := run(wait, peerEv(newer))
	if got.State.Serving() || has(acts, DoServe) {
		t.Fatalf("served epoch %d over a stopped peer with epoch %d: %s %+v", e, newer.Epoch, got.State, acts)
	}
	if !got.Stale || !has(acts, DoPersist) {
		t.Errorf("next to a stopped peer with a newer copy: stale %v, actions %+v: want stale, saved", got.Stale, acts)
	}
	for _, p := range []Peer{{Name: "nodeB", State: Stop, Epoch: e}, {Name: "nodeB", State: Stop, Epoch: e + 3<<8, Stale: true}} {
		if got, _ := run(wait, peerEv(p)); !got.State.Serving() {
			t.Errorf("not serving next to stopped peer %+v: %s", p, got.State)
		}
	}
}

// TestStoppedNewerPeerLostNotServedOver (from a review): the stopped peer
// with the newer copy is then lost (its host shut down): this node must
// not take over with its older copy once its checks pass; nor next to a
// peer heard WAIT with a newer copy that dies before it serves.
func TestStoppedNewerPeerLostNotServedOver(t *testing.T) {
	const e = 4<<8 | 1
	wait := Machine{Name: "nodeA", ID: 1, State: Wait, Epoch: e}
	for _, st := range []State{Stop, Wait} {
		got, acts := run(wait, peerEv(Peer{Name: "nodeB", State: st, Epoch: e + 3<<8}),
			Event{Kind: EvPeerLost}, Event{Kind: EvTick}, Event{Kind: EvChecked, OK: true})
		if got.State.Serving() || has(acts, DoServe) {
			t.Errorf("peer %s with a newer copy, then lost: nodeA serves its older copy (%s, %+v)", st, got.State, acts)
		}
	}
}

// TestSecondHearsNewerPeerThenLost (from a review): a SECOND whose host
// stalled while the peer served alone (a newer epoch) and stepped down
// hears the peer WAIT with the newer copy, then loses it: it must not
// serve its older copy.
func TestSecondHearsNewerPeerThenLost(t *testing.T) {
	const e = 4<<8 | 1
	second := Machine{Name: "nodeA", ID: 1, State: Second, Epoch: e,
		Peer: Peer{Seen: true, Name: "nodeB", State: Prim, Epoch: e, Synced: true}}
	got, acts := run(second, peerEv(Peer{Name: "nodeB", State: Wait, Epoch: e + 3<<8}),
		Event{Kind: EvPeerLost}, Event{Kind: EvTick}, Event{Kind: EvChecked, OK: true})
	if got.State.Serving() || has(acts, DoServe) {
		t.Fatalf("served its older copy after hearing a newer one: %s %+v", got.State, acts)
	}
}
