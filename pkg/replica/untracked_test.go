package replica

import (
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/duet-ha/duet/pkg/wire"
)

// Two clean stops before the peer is resynced: the first stop's window
// (a file changed while duet was stopped, nothing captured it) must still
// be compared after the second start; the second save must not move the
// bitmap's "saved at" past it.
func TestUntrackedSurvivesSecondCleanStop(t *testing.T) {
	state, data := t.TempDir(), t.TempDir()
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	bitmap := filepath.Join(state, "bitmap-d")
	term := func() *Primary {
		ms, err := OpenMeta(state, "d")
		if err != nil {
			t.Fatal(err)
		}
		p, err := NewPrimary(Dir{Name: "d", Path: data}, "127.0.0.1:1", nil, 0, log)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { p.Close() })
		if err := p.BeginTerm(Term{Meta: ms, DirtyPath: bitmap}); err != nil {
			t.Fatal(err)
		}
		return p
	}
	stop := func(p *Primary) {
		if err := p.SaveDirty(); err != nil {
			t.Fatal(err)
		}
		p.meta.Update(func(m *Meta) { m.Running = false })
	}
	// A source whose peer holds its base, stopped cleanly an hour ago
	// with its bitmap saved; a file changed while duet was stopped then.
	ms, err := OpenMeta(state, "d")
	if err != nil {
		t.Fatal(err)
	}
	ms.Update(func(m *Meta) { m.Gen, m.Base, m.Source, m.Consistent, m.Running = 10, 10, true, true, false })
	if err := newDirtySet().save(bitmap, 10); err != nil {
		t.Fatal(err)
	}
	firstStop := time.Now().Add(-time.Hour)
	if err := os.Chtimes(bitmap, firstStop, firstStop); err != nil {
		t.Fatal(err)
	}
	p := term()
	p.mu.Lock()
	pl := p.plan(wire.Welcome{Gen: p.lin.base, State: wire.CopyConsistent})
	p.mu.Unlock()
	if pl.cutoffS == 0 || pl.cutoffS > firstStop.UnixNano() {
		t.Fatalf("after the first clean stop: plan %+v does not compare files changed since %s", pl, firstStop)
	}
	// Stopped cleanly again before the peer came back, started again.
	stop(p)
	p = term()
	p.mu.Lock()
	pl = p.plan(wire.Welcome{Gen: p.lin.base, State: wire.CopyConsistent})
	p.mu.Unlock()
	if pl.cutoffS == 0 || pl.cutoffS > firstStop.UnixNano() {
		t.Fatalf("after a second clean stop: plan %s compares files changed since %s only: a change made while duet was stopped %s ago is never shipped",
			pl.mode, time.Unix(0, pl.cutoffS).Format(time.TimeOnly), time.Since(firstStop).Round(time.Minute))
	}
}
