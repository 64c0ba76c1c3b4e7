package node

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/duet-ha/duet/pkg/capture"
	"github.com/duet-ha/duet/pkg/cluster"
	"github.com/duet-ha/duet/pkg/config"
	"github.com/duet-ha/duet/pkg/loopfs"
	"github.com/duet-ha/duet/pkg/replica"
)

// TestBarrierAfterReadingStoppedFails: stopPrimary cancels the term and
// then stops the capture reading; the replication connection is torn down
// asynchronously after that. A durability call made in between, for a
// write made after the reader stopped, must not be confirmed in any mode:
// the write is in no record and will never be shipped. Sync directories
// failed (Drain: errNoCapture); async ones, which wait on the lag alone,
// answered "ok" (from a review).
func TestBarrierAfterReadingStoppedFails(t *testing.T) {
	for _, mode := range []string{config.ModeSync, config.ModeAsync} {
		t.Run(mode, func(t *testing.T) {
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
			n := testNode(t, t.TempDir())
			n.metrics = newMetrics(n.Status)
			n.drained = sync.NewCond(&n.drainMu)
			p, src := streamingPrimaryVia(t, nil) // still connected: its teardown has not run yet
			n.cfg.Replicate = []config.Replicate{{Name: "data", Path: src, Mode: mode, MaxLag: 2 * time.Second}}
			n.cap, n.primaries = c, []*replica.Primary{p}
			const e = 9
			n.machine.Store(&cluster.Machine{Name: "nodeB", State: cluster.Prim, Epoch: e,
				Peer: cluster.Peer{Seen: true, Name: "nodeA", State: cluster.Second, Epoch: e, Synced: true}})
			n.beginLeaving() // unserve: a swap to an up-to-date SECOND

			n.stopReading(c) // as stopPrimary does
			if err := os.WriteFile(filepath.Join(fs.Mount, "after-stop"), []byte("record"), 0o644); err != nil {
				t.Fatal(err)
			}
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			if got := n.barrier(ctx); !strings.HasPrefix(got, "error:") {
				t.Fatalf("%s directory: a call after the capture stopped reading answered %q (its write is in no record and never shipped)", mode, got)
			}
		})
	}
}
