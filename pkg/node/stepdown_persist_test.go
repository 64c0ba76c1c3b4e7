package node

import (
	"testing"

	"github.com/duet-ha/duet/pkg/cluster"
	"github.com/duet-ha/duet/pkg/config"
)

// TestSplitBrainStepDownStaleOnDiskBeforeUnserve: a serving node that
// hears a serving peer with a newer epoch steps down and marks its copy
// stale. DoUnserve runs for up to barrierTimeout (WaitShipped) plus the
// services' stop timeouts; when the step saved its state only after it, a
// crash (SIGKILL, power) meanwhile left cluster.json at PRIM/ALONE: the
// restarted node loaded "not stale" with its old epoch and, if the winner
// was not seen then (down, or the split back), passed its checks and
// served the copy that lacks the winner's acknowledged writes.
func TestSplitBrainStepDownStaleOnDiskBeforeUnserve(t *testing.T) {
	n := testNode(t, t.TempDir())
	n.cfg.Role = config.RoleSecondary
	alone := cluster.Machine{Name: "nodeB", ID: 2, State: cluster.Alone, Epoch: 3<<8 | 2}
	if err := n.persist(alone); err != nil {
		t.Fatal(err)
	}
	next, acts := cluster.Step(alone, cluster.Event{Kind: cluster.EvPeer,
		Peer: cluster.Peer{Seen: true, Name: "nodeA", State: cluster.Prim, Epoch: 4<<8 | 1}})
	if next.State != cluster.Wait || !next.Stale {
		t.Fatalf("the step does not step down stale: %+v", next)
	}
	var atUnserve *cluster.Machine
	do := func(a cluster.Action) {
		if a.Do == cluster.DoUnserve {
			// The daemon dies here, while the services stop.
			m, err := n.loadMachine()
			if err != nil {
				t.Fatal(err)
			}
			atUnserve = &m
		}
	}
	if _, err := n.carryOut(alone, next, acts, do); err != nil {
		t.Fatal(err)
	}
	if atUnserve == nil {
		t.Fatal("no DoUnserve")
	}
	if !atUnserve.Stale {
		t.Fatalf("a crash while stepping down (split brain lost) restarts with stale=%v, epoch %d: the node forgets it was demoted", atUnserve.Stale, atUnserve.Epoch)
	}
}
