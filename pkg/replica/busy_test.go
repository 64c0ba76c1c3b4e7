package replica

import (
	"context"
	"log/slog"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/duet-ha/duet/pkg/capture"
)

// passCounter is a log handler that counts the primary's passes.
type passCounter struct{ n atomic.Int64 }

func (h *passCounter) Enabled(context.Context, slog.Level) bool { return true }
func (h *passCounter) Handle(_ context.Context, r slog.Record) error {
	if r.Message == "pass built" {
		h.n.Add(1)
	}
	return nil
}
func (h *passCounter) WithAttrs([]slog.Attr) slog.Handler { return h }
func (h *passCounter) WithGroup(string) slog.Handler      { return h }

// An operation in progress (a preop record: fallocate, a clone) waits in
// the journal, up to journal.PreopTimeout, for the record that ends it:
// Take returns nothing for it, the pass requeues nothing, and while
// durability calls came (no batch window before a pass then) the passes
// ran back to back, about a million empty passes a second on one CPU,
// until the operation's end was captured (from a review).
func TestPendingPreopDoesNotSpinBuilder(t *testing.T) {
	top := t.TempDir()
	src := filepath.Join(top, "src")
	if err := os.Mkdir(src, 0o755); err != nil {
		t.Fatal(err)
	}
	f := filepath.Join(src, "f")
	if err := os.WriteFile(f, []byte("hello"), 0o644); err != nil {
		t.Fatal(err)
	}
	sec := newTestSecondary(t, filepath.Join(top, "peer", "state"))
	pc := &passCounter{}
	p, err := NewPrimary(Dir{Name: "data", Path: src}, sec.addr, testLink, 0, slog.New(pc))
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	wg.Go(func() { p.Run(ctx, nil) })
	t.Cleanup(func() { cancel(); wg.Wait(); p.Close() })
	for deadline := time.Now().Add(20 * time.Second); !p.Status().InSync; time.Sleep(5 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("the first full sync did not end within 20 s")
		}
	}
	// fallocate(f, 0, 1 MiB) begins; its end is not captured yet.
	p.Record(&capture.Record{Seq: 1, Ino: inoOf(t, f), Pos: 0, Len: 1 << 20, Kind: capture.KindPreop}, time.Now())
	cctx, stop := context.WithTimeout(ctx, 300*time.Millisecond)
	defer stop()
	var calls int64
	start := pc.n.Load()
	t0 := time.Now()
	for cctx.Err() == nil {
		if err := p.WaitShipped(cctx, nil, Release{}); err != nil && cctx.Err() == nil {
			t.Fatal(err)
		}
		calls++
		time.Sleep(time.Millisecond)
	}
	passes := pc.n.Load() - start
	el := time.Since(t0)
	t.Logf("%d passes in %v while %d calls came, an operation in progress pending", passes, el.Round(time.Millisecond), calls)
	// A pass for each call (each cuts one window short), and one a
	// window otherwise.
	if most := int64(el/batchWindow) + calls + 10; passes > most {
		t.Fatalf("%d passes in %v: the builder spins while an operation is in progress (at most %d expected)", passes, el, most)
	}
}
