package cluster

import "testing"

// TestHandoverTakebackEpochNewerThanReceiver: a giver that takes the role
// back after losing the receiver (94042ad) takes over from a node that may
// in fact be alive and serving (it stalled, or a one-way cut hid its PRIM
// heartbeats): as for any takeover (TestEpochsUnique), the node that took
// over must hold the newer epoch, whichever the IDs, or the two meet and
// the taker, which served ALONE and released calls, steps down and its
// acknowledged writes are replaced by the stalled receiver's copy.
func TestHandoverTakebackEpochNewerThanReceiver(t *testing.T) {
	from := ep(5, 1)
	for _, id := range []uint8{1, 2} {
		// giver: PRIM, hands over to a SECOND receiver.
		giver := Machine{Name: "nodeA", ID: id, State: Prim, Epoch: from,
			Peer: Peer{Seen: true, Name: "nodeB", State: Second, Epoch: from}}
		recv := Machine{Name: "nodeB", ID: 3 - id, State: Second, Epoch: from,
			Peer: Peer{Seen: true, Name: "nodeA", State: Prim, Epoch: from, Synced: true}}
		giver, _ = Step(giver, Event{Kind: EvCmdSwap})
		if giver.State != Wait || !giver.HandedOver {
			t.Fatalf("swap: %s handed over %v", giver.State, giver.HandedOver)
		}
		// The receiver hears the handover and serves.
		recv, _ = Step(recv, peerEv(Peer{Name: "nodeA", State: giver.State, Epoch: giver.Epoch, Handover: true}))
		if recv.State != Prim {
			t.Fatalf("receiver: %s, want PRIM", recv.State)
		}
		// Its PRIM heartbeats never reach the giver (stalled host, one-way
		// cut); the giver loses it, its checks pass, it takes the role back.
		giver, _ = run(giver, Event{Kind: EvPeerLost}, Event{Kind: EvTick}, Event{Kind: EvChecked, OK: true})
		if !giver.State.Serving() {
			t.Fatalf("giver (ID %d): %s, want serving (94042ad)", id, giver.State)
		}
		if giver.Epoch <= recv.Epoch {
			t.Errorf("giver ID %d took the role back at epoch %d; the receiver (ID %d) serves at epoch %d: the taker is not newer", id, giver.Epoch, 3-id, recv.Epoch)
		}
		// They meet: the giver (ALONE, released calls alone) must stay.
		g2, _ := Step(giver, peerEv(Peer{Name: recv.Name, State: recv.State, Epoch: recv.Epoch}))
		r2, _ := Step(recv, peerEv(Peer{Name: giver.Name, State: giver.State, Epoch: giver.Epoch}))
		if !g2.State.Serving() || r2.State.Serving() {
			t.Errorf("giver ID %d: on meeting, giver %s (stale %v), receiver %s: the giver, which acknowledged writes ALONE, steps down and its writes are replaced", id, g2.State, g2.Stale, r2.State)
		}
		// The receiver, after its stall, first notices the loss: ALONE.
		r3, _ := Step(recv, Event{Kind: EvPeerLost})
		if r3.Epoch >= giver.Epoch {
			t.Errorf("giver ID %d: receiver ALONE at epoch %d >= giver's %d", id, r3.Epoch, giver.Epoch)
		}
	}
}
