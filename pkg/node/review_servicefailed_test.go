package node

import (
	"encoding/json"
	"strings"
	"testing"

	"github.com/duet-ha/duet/pkg/cluster"
	"github.com/duet-ha/duet/pkg/stack"
)

// TestStoppedHeldNewerPeerHint: e57e5f1 makes a WAIT node count its copy
// stale before a newer peer that is stale only by a held role
// (StaleHeld). When that peer is STOP (its operator stopped it while its
// check had found the role held, or a Shared primary stepped down for it
// and it was stopped), nothing serves: this node is stale and waits for
// the stopped one, which serves nothing until started. `duet status`
// says why only for a stopped peer that is plainly not stale
// (waitingForPeer), not for one stale only by the held role: the
// operator sees two stale copies, one stopped, and no hint that
// `duet start` there is what brings the pair back.
func TestStoppedHeldNewerPeerHint(t *testing.T) {
	w := cluster.Machine{Name: "nodeB", ID: 2, State: cluster.Wait, Epoch: 5<<8 | 1}
	stopped := cluster.Peer{Name: "nodeA", State: cluster.Stop, Epoch: 7<<8 | 2, Stale: true, StaleHeld: true, Yields: true}
	w, _ = cluster.Step(w, cluster.Event{Kind: cluster.EvPeer, Peer: stopped})
	if !w.Stale {
		t.Fatalf("scenario void: this copy not stale before a newer held-stale peer")
	}
	for i := 0; i < 5; i++ {
		var acts []cluster.Action
		w, acts = cluster.Step(w, cluster.Event{Kind: cluster.EvPeer, Peer: stopped})
		for _, a := range acts {
			if a.Do == cluster.DoServe {
				t.Fatalf("scenario void: served")
			}
		}
	}
	n, _ := stateDirWritesFail(t, w)
	n.machine.Store(&w)
	if why := n.waitingForPeer(); why == "" {
		t.Errorf("nothing serves (this node WAIT stale, epoch %d; %s STOP, stale only by a held role, epoch %d) and duet status gives no hint (waiting_for_peer empty)",
			w.Epoch, stopped.Name, stopped.Epoch)
	}
}

// TestKeeperStatusSaysWhyRoleKept: a PRIM whose service failed kept the
// role because its peer is marked ServiceFailed. Its `duet status` (the
// node where the VIP is, where an operator looks first) says nothing of
// the peer's mark: PeerStatus has no such field, and the ServiceFailed
// line is printed only on the marked node.
func TestKeeperStatusSaysWhyRoleKept(t *testing.T) {
	prim := cluster.Machine{Name: "nodeB", ID: 2, State: cluster.Prim, Epoch: 6<<8 | 2,
		Peer: cluster.Peer{Seen: true, Name: "nodeA", State: cluster.Second, Epoch: 6<<8 | 2, ServiceFailed: true, Yields: true}}
	n, _ := stateDirWritesFail(t, prim)
	n.machine.Store(&prim)
	n.stack = &stack.Stack{Log: n.log}
	n.metrics = newMetrics(n.Status)
	var err error
	if n.hooks, err = newHooks(n.cfg, n.log); err != nil {
		t.Fatal(err)
	}
	b, err2 := json.Marshal(n.Status())
	err = err2
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(b), "service_failed") {
		t.Errorf("the keeper's status says nothing of its peer's failed service (why a failed service here does not move the role): %s", b)
	}
}
