package node

import (
	"context"
	"encoding/json"
	"errors"
	"os"
	"testing"
	"time"

	"github.com/duet-ha/duet/pkg/cluster"
	"github.com/duet-ha/duet/pkg/replica"
	"github.com/duet-ha/duet/pkg/stack"
)

// TestFailedServeNeverPublished: a SECOND that takes a handover and cannot
// take the role (here the capture fails to load) never says it serves, and
// stops at the epoch its copy had, saved. Before, the loop published PRIM
// at its new epoch while serve ran, and stopped at that epoch: the giver,
// hearing a serving peer and then a stopped one with a newer epoch,
// counted its whole copy stale and never served again (the cluster side:
// cluster.TestHandoverReceiverServeFailedGiverServes).
func TestFailedServeNeverPublished(t *testing.T) {
	const e = 5<<8 | 1
	m := cluster.Machine{Name: "nodeB", ID: 2, State: cluster.Second, Epoch: e,
		Peer: cluster.Peer{Seen: true, Name: "nodeA", State: cluster.Prim, Epoch: e, Synced: true, Preferred: true, Boot: 1, Seq: 1}}
	n, said := failServe(t, m, cluster.Peer{Name: "nodeA", State: cluster.Wait, Epoch: e, Handover: true, Preferred: true, Boot: 1, Seq: 2})
	for _, s := range said {
		if s.State.Serving() {
			t.Fatalf("the heartbeats said %s at epoch %d while the role was being taken, and it never was", s.State, s.Epoch)
		}
	}
	if got := n.machine.Load(); got.Epoch != e || got.Stale {
		t.Errorf("stopped at epoch %d stale=%v, want %d, not stale", got.Epoch, got.Stale, e)
	}
	b, err := os.ReadFile(n.statePath())
	if err != nil {
		t.Fatal(err)
	}
	var p persisted
	if err := json.Unmarshal(b, &p); err != nil {
		t.Fatal(err)
	}
	if p.State != "STOP" || p.Epoch != e || p.Stale {
		t.Errorf("saved %s, want STOP at epoch %d, not stale", b, e)
	}
}

// TestServeNotHandedOverPublishedAtOnce: every other serve is said at
// once, before the VIP and the capture are taken: a peer deciding on
// what this node says must not take it for one that does not serve
// while it does (cluster.TestServeFailedReceiverStartedDuringTakebackBothServe).
// Here a WAIT node whose peer is stopped takes the role; its capture
// fails to load, and it stops at its term's epoch.
func TestServeNotHandedOverPublishedAtOnce(t *testing.T) {
	const e = 5<<8 | 1
	m := cluster.Machine{Name: "nodeB", ID: 2, State: cluster.Wait, Epoch: e,
		Peer: cluster.Peer{Seen: true, Name: "nodeA", State: cluster.Stop, Epoch: e, Boot: 1, Seq: 1}}
	n, said := failServe(t, m, cluster.Peer{Name: "nodeA", State: cluster.Stop, Epoch: e, Boot: 1, Seq: 2})
	serving := false
	for _, s := range said {
		serving = serving || s.State.Serving()
	}
	if !serving {
		t.Fatal("the heartbeats never said the node serves while it took the role")
	}
	if got := n.machine.Load(); got.Epoch <= e {
		t.Errorf("stopped at epoch %d, want its term's, newer than %d", got.Epoch, e)
	}
}

// failServe runs nodeB's cluster loop from m, sends it the peer's
// heartbeat hb, on which it serves, holds the capture's load 200 ms and
// then fails it. It returns once the node is STOP, with what it
// published meanwhile, sampled every millisecond.
func failServe(t *testing.T, m cluster.Machine, hb cluster.Peer) (*Node, []cluster.Machine) {
	t.Helper()
	n := loopNode(t)
	n.server = &replica.Server{}
	n.stack = &stack.Stack{Log: n.log}
	loading := make(chan struct{})
	n.next = &preloaded{done: loading, err: errors.New("loading the capture: operation not permitted")}
	n.machine.Store(&m)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		n.loop(ctx, m)
	}()
	t.Cleanup(func() {
		cancel()
		<-done
	})
	var said []cluster.Machine
	watchDone := make(chan struct{})
	stopWatch := make(chan struct{})
	go func() {
		defer close(watchDone)
		for {
			said = append(said, *n.machine.Load())
			select {
			case <-stopWatch:
				return
			case <-time.After(time.Millisecond):
			}
		}
	}()
	n.events <- cluster.Event{Kind: cluster.EvPeer, Peer: hb}
	time.Sleep(200 * time.Millisecond) // serve waits for the capture
	close(loading)
	for end := time.Now().Add(10 * time.Second); n.machine.Load().State != cluster.Stop; time.Sleep(10 * time.Millisecond) {
		if time.Now().After(end) {
			t.Fatalf("serve failed 10 s ago: still %s", n.machine.Load().State)
		}
	}
	time.Sleep(50 * time.Millisecond)
	close(stopWatch)
	<-watchDone
	return n, said
}
