package node

import (
	"context"
	"testing"
	"time"

	"github.com/duet-ha/duet/pkg/cluster"
	"github.com/duet-ha/duet/pkg/stack"
)

// Review of efbaaa7: the start goroutine posts EvServiceDown with
// n.post(ctx) (the daemon's context), and endServiceStart, run by the
// cluster loop in unserve, waits for that goroutine. While the loop is in
// unserve nobody reads n.events: with the buffer full (the receivers fill
// it with EvPeer while the loop is busy) the post never returns, and the
// loop waits for it for good. Here an events channel nobody reads stands
// for the full buffer.
func TestEndServiceStartVersusFailedStartPost(t *testing.T) {
	n := testNode(t, t.TempDir())
	n.events = make(chan cluster.Event) // the loop is in unserve: nobody reads
	n.stack = &stack.Stack{Services: []stack.Service{{Name: "db", Start: "exit 1", Interval: 50 * time.Millisecond,
		StartTimeout: time.Second, StopTimeout: time.Second}},
		Log: n.log, Launch: plainLaunch}
	t.Cleanup(n.stack.Kill)
	n.startServices(context.Background())
	time.Sleep(500 * time.Millisecond) // the start failed; its goroutine posts
	ended := make(chan struct{})
	go func() { n.endServiceStart(); close(ended) }()
	select {
	case <-ended:
	case <-time.After(3 * time.Second):
		t.Fatal("endServiceStart (the cluster loop, in unserve) still waits 3 s later: the start goroutine is blocked posting EvServiceDown to the loop")
	}
}
