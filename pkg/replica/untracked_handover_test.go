package replica

import (
	"context"
	"net"
	"path/filepath"
	"testing"
	"time"

	"github.com/duet-ha/duet/pkg/wire"
)

// TestHandoverLeavesNoUntrackedWindow: node A, the source, hands the role
// over cleanly (HandedOver: every change is on the peer, this copy is a
// consistent replica) and stops its term (stopPrimary: SaveDirty). SaveDirty
// now writes Meta.Untracked (when Run's context ended) whatever the copy
// is: A's meta says Source false and Untracked set. A is then resynced as
// B's replica (resyncDone does not clear Untracked) and, when A becomes the
// source again (a swap back, a failover months later), BeginTerm takes that
// old time as the start of what nothing captured: every file changed
// since - all of the replicated traffic - is compared by checksums
// (bitmap+recent; beyond wire.MaxWant files, a full comparison) where a
// consistent replica's term trusted its empty bitmap before (mode bitmap).
func TestHandoverLeavesNoUntrackedWindow(t *testing.T) {
	top := t.TempDir()
	src := filepath.Join(top, "src")
	makeScaleTree(t, src, 20, 2, 5000)
	r := syncedThenStopped(t, src, filepath.Join(top, "peer"))
	// A's next term, synced, then handed over and stopped as the daemon
	// does (leave: HandedOver; stopPrimary: cancel, SaveDirty).
	r.startReplica()
	r.startSource()
	r.waitSynced()
	deadline := time.Now().Add(10 * time.Second)
	for {
		if err := r.p.HandedOver(); err != nil {
			t.Fatal(err)
		}
		if !r.pms.Get().Source {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("HandedOver did not record the handover: %+v", r.pms.Get())
		}
		time.Sleep(5 * time.Millisecond)
	}
	r.cleanStop()
	t.Logf("A after the handover: %+v", r.pms.Get())

	// B (the old replica) is the source; A its replica.
	msA := r.pms
	s := &Server{Link: testLink, StateDir: filepath.Join(top, "state"), Dirs: []Dir{{Name: "data", Path: src}}, Log: r.log,
		Metas: map[string]*MetaStore{"data": msA}}
	s.SetAccept(true)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	go s.Serve(ctx, ln)
	msB, err := OpenMeta(filepath.Join(top, "peer", "state"), "data")
	if err != nil {
		t.Fatal(err)
	}
	b, err := NewPrimary(Dir{Name: "data", Path: filepath.Join(top, "peer", "data")}, ln.Addr().String(), testLink, 0, r.log)
	if err != nil {
		t.Fatal(err)
	}
	if err := b.BeginTerm(Term{Meta: msB, DirtyPath: filepath.Join(top, "peer", "state", "bitmap-data"), Margin: r.margin}); err != nil {
		t.Fatal(err)
	}
	bctx, bcancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); b.Run(bctx, nil) }()
	for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(time.Millisecond) {
		st := b.Status()
		if st.InSync && st.FullSyncs > 0 && !st.Resync.Active && msA.Get().Consistent {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("B did not resync A: %+v", st)
		}
	}
	bcancel()
	<-done
	b.Close()
	cancel()
	s.Close(5 * time.Second)
	t.Logf("A as B's replica, resynced: %+v", msA.Get())

	// A becomes the source again.
	a, err := NewPrimary(Dir{Name: "data", Path: src}, "127.0.0.1:1", testLink, 0, r.log)
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	if err := a.BeginTerm(Term{Meta: msA, DirtyPath: filepath.Join(filepath.Dir(src), "state", "bitmap-data"), Margin: r.margin}); err != nil {
		t.Fatal(err)
	}
	a.mu.Lock()
	pl := a.plan(wire.Welcome{Gen: a.lin.base, State: wire.CopyConsistent})
	untracked := a.lin.untracked
	a.mu.Unlock()
	if untracked != 0 || pl.mode != "bitmap" {
		t.Fatalf("A, a consistent replica of B's generation, becomes the source: resync mode %q, untracked window since %s (%v ago): "+
			"the handover term's stop time, never cleared, widens every later term's comparison",
			pl.mode, time.Unix(0, untracked).Format(time.RFC3339Nano), time.Since(time.Unix(0, untracked)).Round(time.Millisecond))
	}
}
