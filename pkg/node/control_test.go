package node

import (
	"context"
	"net"
	"path/filepath"
	"testing"
	"time"

	"github.com/duet-ha/duet/pkg/barrier"
	"github.com/duet-ha/duet/pkg/cluster"
)

// TestBarrierReportOnNewConnection: a supervisor whose calls overlap opens
// a second barrier connection while timings of answered calls wait to be
// reported; the first request on it carries one. The daemon must answer
// it as a barrier: refused as an unknown request, the durability call
// failed with EIO.
func TestBarrierReportOnNewConnection(t *testing.T) {
	n := testNode(t, t.TempDir())
	n.metrics = newMetrics(n.Status)
	// PRIM with nothing to replicate: every barrier answers "ok".
	n.machine.Store(&cluster.Machine{Name: "nodeB", State: cluster.Prim})
	sock := filepath.Join(t.TempDir(), "duet.sock")
	ln, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(func() { cancel(); ln.Close() })
	go n.serveControl(ctx, ln)

	b := NewBarrierClient(sock)
	if err := b.Wait(); err != nil {
		t.Fatalf("first call: %v", err)
	}
	b.Report(barrier.Timing{Held: 3 * time.Millisecond, Local: time.Millisecond})
	// Another thread's call is on the open connection: this one opens a
	// new connection, and its first request carries the report.
	busy := <-b.idle
	defer busy.c.Close()
	if err := b.Wait(); err != nil {
		t.Fatalf("a call on a new connection, with a timing to report: %v", err)
	}
	held := false
	for _, s := range n.stages.Snapshot() {
		held = held || s.Stage == "held"
	}
	if !held {
		t.Error("the reported timing was not counted")
	}
}
