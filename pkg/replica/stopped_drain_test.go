package replica

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/duet-ha/duet/pkg/capture"
)

// stoppedKernel is the capture of a term that stopped reading
// (stopPrimary): the records still in the ring never reach the primary.
type stoppedKernel struct{}

func (stoppedKernel) ForgetChunks([]capture.CaptureChunkKey) error { return nil }
func (stoppedKernel) ForgetAttr(capture.InodeKey)                  {}
func (stoppedKernel) Seq() uint64                                  { return 0 }
func (stoppedKernel) Drain() error {
	return fmt.Errorf("the capture stopped reading: %w", ErrClosed)
}

// TestWaitShippedAfterReadingStopped: a durability call made while the
// node leaves the primary role, after its capture stopped reading. The
// write's record sits in the ring and is never handed to the primary; the
// call must fail, not be answered as shipped. (Drain returned at once
// without saying so: WaitShipped returned nil with the peer holding the
// old bytes, while the connection was still up; a review of the stop's
// change found it.)
func TestWaitShippedAfterReadingStopped(t *testing.T) {
	top := t.TempDir()
	src := filepath.Join(top, "src")
	os.Mkdir(src, 0o755)
	f := filepath.Join(src, "f")
	os.WriteFile(f, []byte("old"), 0o644)
	sec := newTestSecondary(t, filepath.Join(top, "peer", "state"))
	p, err := NewPrimary(Dir{Name: "data", Path: src}, sec.addr, testLink, 0, slog.New(slog.NewTextHandler(io.Discard, nil)))
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	wg.Add(1)
	go func() { defer wg.Done(); p.Run(ctx, stoppedKernel{}) }()
	defer func() { cancel(); wg.Wait() }()
	for deadline := time.Now().Add(10 * time.Second); !p.Status().InSync; time.Sleep(5 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("no initial sync")
		}
	}
	// The write: its record is reserved in the stopped ring, never Record()ed.
	want := []byte("acknowledged-by-fsync")
	os.WriteFile(f, want, 0o644)
	// Its fsync.
	err = p.WaitShipped(context.Background(), stoppedKernel{}, Release{})
	if err == nil {
		got, _ := os.ReadFile(filepath.Join(sec.data, "f"))
		t.Fatalf("WaitShipped returned nil after the capture stopped reading; the peer holds %q (the write: %q)", got, want)
	}
	if !errors.Is(err, ErrClosed) {
		t.Fatalf("WaitShipped: %v, want ErrClosed", err)
	}
}
