package node

import (
	"testing"

	"github.com/duet-ha/duet/pkg/cluster"
)

// TestSharedStepDownReleasesAlone: a Shared primary that resumed from a
// stall went ALONE (announced) and then hears its peer WAIT with a newer
// copy, not stale (or stale only by a held role): cluster.Step steps it
// down, and the peer's copy becomes the reference. The loop carries out
// DoUnserve before it publishes the new machine (n.machine is still the
// serving one, apply in cluster.go), so beginLeaving's
// peerCannotTakeOver reads ALONE (announced, witnessed): leavingAlone,
// and every durability call made while the services stop (their
// shutdown flushes, in-flight commits) is released alone, acknowledged,
// and then replaced by the peer's copy. DESIGN §7 says a node leaving
// the role for such a peer releases nothing alone; the branch added for
// that (!m.State.Serving() && p.StaleHeld) never sees a non-serving
// machine during a leave. (From a third review; it failed on c3a547d.)
func TestSharedStepDownReleasesAlone(t *testing.T) {
	for _, held := range []bool{false, true} {
		prev := cluster.Machine{Name: "nodeA", ID: 1, State: cluster.Alone, Epoch: 6<<8 | 1, Preferred: true, Shared: true,
			Peer: cluster.Peer{Name: "nodeB", State: cluster.Second, Epoch: 5<<8 | 1}}
		n, _ := stateDirWritesFail(t, prev)
		n.machine.Store(&prev)
		n.announcedAlone.Store(prev.Epoch)
		peer := cluster.Peer{Name: "nodeB", State: cluster.Wait, Epoch: 7<<8 | 2, Stale: held, StaleHeld: held, Yields: true}
		next, acts := cluster.Step(prev, cluster.Event{Kind: cluster.EvPeer, Peer: func() cluster.Peer { peer.Seen = true; return peer }()})
		unserve := false
		for _, a := range acts {
			unserve = unserve || a.Do == cluster.DoUnserve
		}
		if !unserve || next.State != cluster.Wait || !next.Stale {
			t.Fatalf("scenario void: no step down (%s stale %v)", next.State, next.Stale)
		}
		// As the loop: n.machine is prev until the leave is done, and
		// unserve is told whether the new state counts this copy stale.
		n.beginLeaving(next.Stale)
		if n.tryRelease() {
			t.Errorf("held=%v: stepping down for %s's newer copy (epoch %d, here %d), this node releases durability calls alone during the leave; they are acknowledged and then replaced by the peer's copy", held, peer.Name, peer.Epoch, prev.Epoch)
		}
		// What the code expects to see (the published machine after the leave):
		n.machine.Store(&next)
		if held && n.peerCannotTakeOver() {
			t.Errorf("held: even with the new machine, released")
		}
	}
}
