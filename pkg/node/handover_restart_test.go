package node

import (
	"testing"

	"github.com/duet-ha/duet/pkg/cluster"
	"github.com/duet-ha/duet/pkg/config"
)

// TestHandoverGiverRestartedDoesNotServeAlone: a primary hands the role
// to its SECOND (duet swap, duet stop, a service failure, or its daemon
// stopping on SIGTERM: systemctl stop, a reboot) and its daemon ends
// before it hears the peer serve (at SIGTERM the loop has already
// returned when the handover heartbeats go out). The receiver serves,
// loses the giver, goes ALONE and acknowledges writes alone (rightly: the
// giver is lost). Then the receiver dies and the giver's daemon starts
// again. When the handover was not saved, cluster.json said WAIT, not
// stale: after cluster.timeout its checks passed (the receiver is down:
// the witness answers, the VIP is free) and it served its copy from
// before the handover; the receiver, back, saw a serving peer, marked
// itself stale and was resynced from the giver: its acknowledged writes
// were discarded. The giver is in effect the old secondary here, which
// waits for `duet prim --force` (docs/DESIGN.md §8).
func TestHandoverGiverRestartedDoesNotServeAlone(t *testing.T) {
	const e = 5<<8 | 1
	n := testNode(t, t.TempDir())
	n.cfg.Node = "nodeA"
	n.cfg.Role = config.RolePrimary // the giver is the preferred node (also fails with secondary)
	prim := cluster.Machine{Name: "nodeA", ID: 1, State: cluster.Prim, Epoch: e, Preferred: true,
		Peer: cluster.Peer{Seen: true, Name: "nodeB", State: cluster.Second, Epoch: e}}
	if err := n.persist(prim); err != nil {
		t.Fatal(err)
	}
	// The daemon stops: the loop applies EvCmdSwap (as at ctx.Done),
	// carries out the actions (unserve recorded, not run) and returns.
	next, acts := cluster.Step(prim, cluster.Event{Kind: cluster.EvCmdSwap})
	if next.State != cluster.Wait || !next.HandedOver {
		t.Fatalf("the swap step: %+v", next)
	}
	var got []cluster.Do
	if _, err := n.carryOut(prim, next, acts, record(&got)); err != nil {
		t.Fatal(err)
	}
	// nodeB took over, went ALONE (nodeA gone) and acknowledged writes
	// that nodeA lacks; then nodeB died. nodeA's daemon starts again:
	m, err := n.loadMachine()
	if err != nil {
		t.Fatal(err)
	}
	m, acts1 := cluster.Step(m, cluster.Event{Kind: cluster.EvTick})
	m, acts2 := cluster.Step(m, cluster.Event{Kind: cluster.EvChecked, OK: true})
	all := append(acts1, acts2...)
	for _, a := range all {
		if a.Do == cluster.DoServe {
			t.Fatalf("the node that handed the role over restarted with stale=%v and served alone (%s, epoch %d) without ever seeing the peer it handed to: "+
				"the writes that peer acknowledged after the handover are lost", m.Stale, m.State, m.Epoch)
		}
	}
}
