package node

import (
	"log/slog"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"
)

// TestDrainShortOfTargetIsNotSuccess: a barrier's Drain waits for every
// record reserved before the call to be dispatched to the primaries; then
// WaitShipped takes p.added as the call's target. When the reader does not
// get there (it died, or it is starved), Drain gave up after drainTimeout
// and returned nil: the caller's record was then not in the target, the
// last pass covered the target, and the durability call was answered
// "ok" with its change in no batch. Drain must fail instead (the call
// gets EIO), as it does once reading stopped.
func TestDrainShortOfTargetIsNotSuccess(t *testing.T) {
	mount, c := captureOnLoop(t)
	n := &Node{log: slog.New(slog.NewTextHandler(os.Stderr, nil)), cap: c}
	n.drained = sync.NewCond(&n.drainMu)
	// The caller's write: a record reserved, never dispatched (no reader
	// runs, as after dispatch returned on a read error).
	if err := os.WriteFile(filepath.Join(mount, "committed"), []byte("record 1\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	ctr, err := c.Counters()
	if err != nil || ctr.Seq == 0 {
		t.Fatalf("no record reserved (%+v, %v)", ctr, err)
	}
	start := time.Now()
	err = kernel{n}.Drain()
	t.Logf("Drain returned after %v: %v (dispatched %d of %d records)", time.Since(start).Round(time.Millisecond), err, n.dispatched.Load(), ctr.Seq)
	if err == nil && n.dispatched.Load() < ctr.Seq {
		t.Fatalf("Drain returned nil with %d of %d records reserved before the call never dispatched: "+
			"WaitShipped's target leaves the caller's write out and the call is answered ok", n.dispatched.Load(), ctr.Seq)
	}
}
