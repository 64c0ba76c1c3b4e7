package replica

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"
)

// TestFailedDiskStartsNoResync: a primary whose copy's disk failed starts
// no connection, so no resync: one would read the failed disk and mark
// the peer's copy as being rewritten, and the peer, in sync, could not
// take the role over (the campaign's disk-fails-primary on XFS). Its
// DiskCheck is asked before connecting.
func TestFailedDiskStartsNoResync(t *testing.T) {
	top := t.TempDir()
	src := filepath.Join(top, "src")
	os.Mkdir(src, 0o755)
	sec := newTestSecondary(t, filepath.Join(top, "peer", "state"))
	p, err := NewPrimary(Dir{Name: "data", Path: src}, sec.addr, testLink, 0, slog.New(slog.NewTextHandler(io.Discard, nil)))
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	var checks sync.WaitGroup
	checks.Add(1)
	var once sync.Once
	p.DiskCheck = func(context.Context) error {
		once.Do(checks.Done)
		p.DiskFailed() // as the node's check does for a failed disk
		return errors.New("fsync: input/output error")
	}
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	wg.Add(1)
	go func() { defer wg.Done(); p.Run(ctx, nil) }()
	defer func() { cancel(); wg.Wait() }()
	checks.Wait()
	time.Sleep(300 * time.Millisecond) // a connection would have been made by now
	st := p.Status()
	if st.Connected || st.Resync.Active {
		t.Errorf("a primary whose disk failed connected (%v) or resyncs (%v)", st.Connected, st.Resync.Active)
	}
	if !strings.Contains(st.LastError, "disk failed") {
		t.Errorf("last error %q, want it to say the disk failed", st.LastError)
	}
}
