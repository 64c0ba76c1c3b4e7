package node

import (
	"context"
	"log/slog"
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

// captureOnLoop opens a capture (not reading) of a fresh ext4 loop
// filesystem and returns its mount point; both end with the test.
func captureOnLoop(t *testing.T) (string, *capture.Capture) {
	t.Helper()
	fs := loopfs.Make(t, "ext4", 64)
	var st syscall.Stat_t
	if err := syscall.Stat(fs.Mount, &st); err != nil {
		t.Fatal(err)
	}
	c, err := capture.Open(capture.Options{Devices: []uint64{st.Dev}})
	if err != nil {
		t.Fatalf("capture: %v", err)
	}
	t.Cleanup(func() { c.Close() })
	return fs.Mount, c
}

// TestDrainEndsWhenReadingStops: a barrier's Drain waits for the records
// reserved before it to be dispatched. When the node leaves the primary
// role the reader stops with records still in the ring; the Drain must
// end then, not after drainTimeout (10 s): stopPrimary waits for the
// primaries, one of them in a Drain, and the handover waited with them
// (a stop with a writer running took 10.2 s in CI, the peer serving only
// then). With the old stop (the capture closed, c.Close()) this Drain
// returned after 10 s.
func TestDrainEndsWhenReadingStops(t *testing.T) {
	mount, c := captureOnLoop(t)
	n := &Node{log: slog.New(slog.NewTextHandler(os.Stderr, nil)), cap: c}
	n.drained = sync.NewCond(&n.drainMu)
	// Records reserved, none dispatched (no reader runs).
	if err := os.WriteFile(filepath.Join(mount, "f"), []byte("hello"), 0o644); err != nil {
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

// TestBarrierWithoutPrimariesFails: while the role is handed over, the
// state still serves after stopPrimary has ended the term's primaries and
// the capture sees no write any more. A durability call then was answered
// "ok" with nothing checked (no primary to wait on): a writer under duet
// exec kept writing during a swap and 4 of its acknowledged records were
// missing on the new primary (TestSwapTwice, 1 run in 8).
func TestBarrierWithoutPrimariesFails(t *testing.T) {
	n := testNode(t, t.TempDir())
	n.metrics = newMetrics(n.Status)
	n.cfg.Replicate = []config.Replicate{{Name: "data", Path: t.TempDir(), Mode: config.ModeSync}}
	const e = 9
	n.machine.Store(&cluster.Machine{Name: "nodeB", State: cluster.Prim, Epoch: e,
		Peer: cluster.Peer{Seen: true, Name: "nodeA", State: cluster.Second, Epoch: e, Synced: true}})
	if got := n.barrier(context.Background()); !strings.HasPrefix(got, "error:") {
		t.Fatalf("a durability call with no primary of the term answered %q", got)
	}
}

// TestDrainAfterReadingStoppedFails: once the reader stopped, a Drain
// fails even when the counters show nothing outstanding: the hooks are
// detached soon after, and a write made then leaves no record, so "nothing
// outstanding" proved nothing (a durability call after it was answered
// "ok" for a write no record and no peer had).
func TestDrainAfterReadingStoppedFails(t *testing.T) {
	_, c := captureOnLoop(t)
	n := &Node{log: slog.New(slog.NewTextHandler(os.Stderr, nil)), cap: c}
	n.drained = sync.NewCond(&n.drainMu)
	if err := (kernel{n}).Drain(); err != nil {
		t.Fatalf("Drain with nothing outstanding, reading: %v", err)
	}
	n.stopReading(c)
	if err := (kernel{n}).Drain(); err == nil {
		t.Fatal("Drain after the reader stopped returned nil: a call then would be confirmed with its write in no record")
	}
}

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
			mount, c := captureOnLoop(t)
			n := testNode(t, t.TempDir())
			n.metrics = newMetrics(n.Status)
			n.drained = sync.NewCond(&n.drainMu)
			p, src := streamingPrimaryVia(t, nil) // still connected: its teardown has not run yet
			n.cfg.Replicate = []config.Replicate{{Name: "data", Path: src, Mode: mode, MaxLag: 2 * time.Second}}
			n.cap, n.primaries = c, []*replica.Primary{p}
			const e = 9
			n.machine.Store(&cluster.Machine{Name: "nodeB", State: cluster.Prim, Epoch: e,
				Peer: cluster.Peer{Seen: true, Name: "nodeA", State: cluster.Second, Epoch: e, Synced: true}})
			n.beginLeaving(false) // unserve: a swap to an up-to-date SECOND

			n.stopReading(c) // as stopPrimary does
			if err := os.WriteFile(filepath.Join(mount, "after-stop"), []byte("record"), 0o644); err != nil {
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
