package node

import (
	"log/slog"
	"os"
	"path/filepath"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/duet-ha/duet/pkg/capture"
	"github.com/duet-ha/duet/pkg/loopfs"
)

// TestDrainEndsWhenReadingStops: a barrier's Drain waits for the records
// reserved before it to be dispatched. When the node leaves the primary
// role the reader stops with records still in the ring; the Drain must
// end then, not after drainTimeout (10 s): stopPrimary waits for the
// primaries, one of them in a Drain, and the handover waited with them
// (a stop with a writer running took 10.2 s in CI, the peer serving only
// then). With the old stop (the capture closed, c.Close()) this Drain
// returned after 10 s.
func TestDrainEndsWhenReadingStops(t *testing.T) {
	fs := loopfs.Make(t, "ext4", 64)
	var st syscall.Stat_t
	if err := syscall.Stat(fs.Mount, &st); err != nil {
		t.Fatal(err)
	}
	c, err := capture.Open(capture.Options{Devices: []uint64{st.Dev}})
	if err != nil {
		t.Fatalf("capture: %v", err)
	}
	defer c.Close()
	n := &Node{log: slog.New(slog.NewTextHandler(os.Stderr, nil)), cap: c}
	n.drained = sync.NewCond(&n.drainMu)
	// Records reserved, none dispatched (no reader runs).
	if err := os.WriteFile(filepath.Join(fs.Mount, "f"), []byte("hello"), 0o644); err != nil {
		t.Fatal(err)
	}
	if ctr, err := c.Counters(); err != nil || ctr.Seq == 0 {
		t.Fatalf("no record reserved (%+v, %v)", ctr, err)
	}
	done := make(chan time.Time, 1)
	var derr error
	go func() {
		derr = kernel{n}.Drain()
		done <- time.Now()
	}()
	time.Sleep(200 * time.Millisecond)
	select {
	case <-done:
		t.Fatal("Drain returned with records not dispatched")
	default:
	}
	stop := time.Now()
	n.stopReading(c)
	select {
	case at := <-done:
		t.Logf("Drain ended %v after reading stopped: %v", at.Sub(stop).Round(time.Microsecond), derr)
		// Its records will never be dispatched: the durability call
		// must not count them covered (TestWaitShippedAfterReadingStopped).
		if derr == nil {
			t.Fatal("Drain ended short of its target without an error")
		}
	case <-time.After(drainTimeout / 2):
		t.Fatalf("Drain still waiting %v after reading stopped (it waits out drainTimeout, %v)", drainTimeout/2, drainTimeout)
	}
}
