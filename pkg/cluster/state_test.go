package cluster

import (
	"strings"
	"testing"
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
								out = append(out, Machine{Name: "nodeA", State: s, Epoch: 5, Stale: stale, Preferred: pref, HandedOver: ho,
									Peer: Peer{Seen: seen, Name: "nodeB", State: ps, Epoch: pe, Preferred: !pref}})
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
			for _, f := range []Peer{{}, {Stale: true}, {Synced: true}, {Handover: true}, {Preferred: true}} {
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
		Event{Kind: EvCmdPrim}, Event{Kind: EvCmdPrim, Force: true}, Event{Kind: EvServiceDown, Why: "web"}, Event{Kind: EvServeFailed, Why: "VIP in use"})
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
			// A promotion bumps the epoch past both copies'.
			if became && (got.Epoch <= m.Epoch || got.Epoch <= got.Peer.Epoch) {
				t.Errorf("%+v + %+v: promoted without a new epoch (%d)", m, ev, got.Epoch)
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
			// A handed-over node claims nothing while the peer is up.
			if m.HandedOver && m.Peer.Seen && became && ev.Kind != EvCmdPrim && ev.Kind != EvPeerLost {
				t.Errorf("%+v + %+v: handed over, then took the role back", m, ev)
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
	a := Machine{Name: "nodeA", State: Wait, Preferred: true}
	b := Machine{Name: "nodeB", State: Wait, Stale: true}
	peerOf := func(m Machine, synced bool) Peer {
		return Peer{Name: m.Name, State: m.State, Epoch: m.Epoch, Stale: m.Stale, Preferred: m.Preferred, Synced: synced, Handover: m.HandedOver}
	}

	// Fresh cluster: the preferred node serves, the other syncs.
	a, _ = Step(a, peerEv(peerOf(b, false)))
	if a.State != Prim || a.Epoch != 1 {
		t.Fatalf("fresh start: nodeA %s epoch %d, want PRIM 1", a.State, a.Epoch)
	}
	b, _ = Step(b, peerEv(peerOf(a, false)))
	if b.State != Wait {
		t.Fatalf("nodeB %s while resyncing, want WAIT", b.State)
	}
	b, _ = Step(b, peerEv(peerOf(a, true)))
	if b.State != Second || b.Epoch != 1 || b.Stale {
		t.Fatalf("nodeB after sync: %+v", b)
	}
	a, _ = Step(a, peerEv(peerOf(b, false)))

	// Failover: nodeA dies; nodeB checks, then serves with a new epoch.
	b2, acts := Step(b, Event{Kind: EvPeerLost})
	if !has(acts, DoCheck) || b2.State != Second {
		t.Fatalf("peer lost: %+v %+v", b2, acts)
	}
	b2, _ = Step(b2, Event{Kind: EvChecked, OK: true})
	if b2.State != Alone || b2.Epoch != 2 {
		t.Fatalf("after checks: %s epoch %d, want ALONE 2", b2.State, b2.Epoch)
	}
	// Failed checks (old primary still answers for the VIP): stay out.
	b3, _ := run(b, Event{Kind: EvPeerLost}, Event{Kind: EvChecked, Why: "VIP answered"})
	if b3.State != Wait || !b3.Stale {
		t.Fatalf("failed checks: %+v", b3)
	}
	// The old primary returns (restarted, epoch 1) and must not serve.
	a2 := Machine{Name: "nodeA", State: Wait, Epoch: 1, Preferred: true}
	a2, _ = Step(a2, peerEv(peerOf(b2, false)))
	if a2.State != Wait {
		t.Fatalf("old primary next to ALONE peer: %s", a2.State)
	}
	b2, _ = Step(b2, peerEv(peerOf(a2, false)))
	if b2.State != Prim {
		t.Fatalf("ALONE with peer back: %s", b2.State)
	}
	a2, _ = Step(a2, peerEv(peerOf(b2, true)))
	if a2.State != Second || a2.Epoch != 2 {
		t.Fatalf("old primary after resync: %+v", a2)
	}

	// Swap: only with a peer in sync; the peer serves on the handover.
	b2, _ = Step(b2, peerEv(peerOf(a2, false)))
	b4, acts := Step(b2, Event{Kind: EvCmdSwap})
	if b4.State != Wait || !b4.HandedOver || !has(acts, DoUnserve) {
		t.Fatalf("swap: %+v %+v", b4, acts)
	}
	a3, _ := Step(a2, peerEv(peerOf(b4, false)))
	if a3.State != Prim || a3.Epoch != 3 {
		t.Fatalf("handover: %+v", a3)
	}
	b4, _ = Step(b4, peerEv(peerOf(a3, false)))
	if b4.State != Wait || b4.HandedOver {
		t.Fatalf("after handover: %+v", b4)
	}
	_, acts = Step(Machine{Name: "nodeA", State: Prim, Epoch: 3, Peer: Peer{Seen: true, State: Wait, Epoch: 2}}, Event{Kind: EvCmdSwap})
	if !has(acts, DoRefuse) {
		t.Fatalf("swap to a peer not in sync was not refused: %+v", acts)
	}

	// A restarted secondary is stale: it never serves alone unless forced.
	s := Machine{Name: "nodeB", State: Wait, Epoch: 2, Stale: true}
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
	if s.State != Alone || s.Epoch != 3 {
		t.Fatalf("forced: %+v", s)
	}

	// Split brain healed: the same node steps down on both sides.
	x := Machine{Name: "nodeA", State: Alone, Epoch: 3, Preferred: true}
	y := Machine{Name: "nodeB", State: Alone, Epoch: 3}
	x2, _ := Step(x, peerEv(peerOf(y, false)))
	y2, _ := Step(y, peerEv(peerOf(x, false)))
	if !x2.State.Serving() || y2.State != Wait || !y2.Stale {
		t.Fatalf("split brain: nodeA %s, nodeB %s stale=%v", x2.State, y2.State, y2.Stale)
	}

	// Isolation: a primary that loses peer and witness steps down.
	z, acts := run(Machine{Name: "nodeA", State: Prim, Epoch: 3, Peer: Peer{Seen: true, State: Second, Epoch: 3}},
		Event{Kind: EvPeerLost}, Event{Kind: EvIsolated})
	if z.State != Wait || z.Stale || !has(acts, DoUnserve) {
		t.Fatalf("isolated: %+v", z)
	}
}

func TestHeartbeatRoundTrip(t *testing.T) {
	key := []byte("0123456789abcdef")
	h := Heartbeat{Name: "nodeA", State: Prim, Epoch: 7, Preferred: true, Synced: true, Boot: 99, Seq: 3}
	b := h.Marshal(key)
	got, err := ParseHeartbeat(b, key)
	if err != nil || got != h {
		t.Fatalf("round trip: %+v, %v", got, err)
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
	var r Replay
	if !r.Fresh(&h) || r.Fresh(&h) {
		t.Error("replay of the same heartbeat accepted")
	}
	h2 := h
	h2.Seq = 4
	if !r.Fresh(&h2) {
		t.Error("next heartbeat refused")
	}
	h3 := h
	h3.Boot, h3.Seq = 100, 1
	if !r.Fresh(&h3) {
		t.Error("heartbeat of a new boot refused")
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
