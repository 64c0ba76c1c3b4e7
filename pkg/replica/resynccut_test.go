package replica

import (
	"context"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// A resync's connection ends while the resync starts: the daemon's
// DiskCheck (a probe that fsyncs the directory, milliseconds) runs at the
// top of fullSync, and the peer's daemon exits meanwhile (disk-fails-
// secondary: its state_dir probe fails it as a crash), or the peer closes
// the connection at once. fullSync then drops the journal's changes
// (DropSettled: "the resync reads them anyway") and returns on ctx.Err()
// before forgetMarks: the kernel's attr mark of every inode dropped stays
// set. A directory among them (the NFS volume's "vol") emits no record
// again for the rest of the term; the next resync lists it as it is, and
// every file created in it afterwards is an inode the shadow does not
// know, whose directory never reports it: skipped by every pass, counted
// covered by the barrier, never on the peer, while the peer is in sync.
func TestResyncCutAtStartLeavesMarksStuck(t *testing.T) {
	top := t.TempDir()
	src := filepath.Join(top, "src")
	vol := filepath.Join(src, "vol")
	if err := os.MkdirAll(vol, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(vol, "acks"), []byte("000000000\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	volIno := inoOf(t, vol)
	sec := newTestSecondary(t, filepath.Join(top, "peer", "state"))
	p, err := NewPrimary(Dir{Name: "data", Path: src}, sec.addr, testLink, 0, slog.New(slog.NewTextHandler(io.Discard, nil)))
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	k := newAuditKernel(p)
	var armed, fired atomic.Bool
	p.DiskCheck = func(ctx context.Context) error {
		if !armed.CompareAndSwap(true, false) {
			return nil
		}
		// While the probe runs: the NFS client creates a file in vol
		// (the primary serves on), and the peer's connection ends.
		k.write(t, vol, "f-000001", []byte("file 1\n"))
		p.Drop("test: the peer's daemon exited")
		<-ctx.Done()
		fired.Store(true)
		// node's DiskCheck: a probe cut short by ctx is no disk failure.
		return nil
	}
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	wg.Add(1)
	go func() { defer wg.Done(); p.Run(ctx, k) }()
	defer func() { cancel(); wg.Wait() }()
	waitFor(t, "the first sync", func() bool { return p.Streaming() && p.Status().FullSyncs == 1 })

	armed.Store(true)
	p.Resync(false) // any resync start: in the campaign, the reconnect's (sessionLost)
	waitFor(t, "the resync cut at its start", fired.Load)
	waitFor(t, "the resync of the next connection", func() bool { return p.Streaming() && p.Status().FullSyncs == 2 })
	if _, err := os.Stat(filepath.Join(sec.data, "vol", "f-000001")); err != nil {
		t.Fatalf("the resync did not bring vol/f-000001: %v", err)
	}
	t.Logf("after the resync: peer in sync %v, vol's attr mark still set: %v", p.Streaming(), k.markedAttr(volIno))

	// The client creates the next file and COMMITs it.
	k.write(t, vol, "f-000002", []byte("file 2\n"))
	wctx, wcancel := context.WithTimeout(ctx, 10*time.Second)
	defer wcancel()
	if err := p.WaitShipped(wctx, k, Release{}); err != nil {
		t.Fatalf("durability call: %v", err)
	}
	time.Sleep(200 * time.Millisecond)
	_, err = os.Stat(filepath.Join(sec.data, "vol", "f-000002"))
	t.Logf("durability call returned; peer in sync: %v; vol/f-000002 on the peer: %v", p.Streaming(), err == nil)
	if err != nil {
		t.Fatalf("vol/f-000002 was acknowledged durable with the peer in sync, but the peer lacks it (%v): "+
			"the attr mark of vol, dropped from the journal by the resync cut at its start, was never forgotten (still set: %v)",
			err, k.markedAttr(volIno))
	}
}
