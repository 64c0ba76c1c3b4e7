package replica

import (
	"bytes"
	"context"
	"crypto/rand"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/duet-ha/duet/pkg/capture"
)

// gateKernel is a capture that emits nothing by itself. The second build
// pass that takes inode ino (it drops the inode's in-flight marks before
// reading anything) waits at the gate until the test opens it.
type gateKernel struct {
	ino    uint64
	mu     sync.Mutex
	passes int
	second chan struct{} // closed when the second pass waits at the gate
	open   chan struct{}
}

func (k *gateKernel) ForgetChunks(keys []capture.CaptureChunkKey) error {
	for _, c := range keys {
		if c.Ino == k.ino {
			k.mu.Lock()
			k.passes++
			n := k.passes
			k.mu.Unlock()
			if n == 2 {
				close(k.second)
				<-k.open
			}
			break
		}
	}
	return nil
}
func (k *gateKernel) ForgetAttr(capture.InodeKey) {}
func (k *gateKernel) Seq() uint64                 { return 0 }
func (k *gateKernel) Drain() error                { return nil }

// A buffered write is reported (write_end) before it moves the file's
// size, and a sequential one is announced ahead of the pages it has
// copied (bpf/capture.bpf.c data()): a pass that reads the file in
// between finds the reported bytes beyond EOF and requeues them. The
// write then returns and the writer calls fsync, with no record since:
// the barrier may return only once the peer holds what the write put
// there, not on the strength of the pass that found it missing.
func TestBarrierWaitsForBytesBeyondEOFOfItsWrite(t *testing.T) {
	top := t.TempDir()
	src := filepath.Join(top, "src")
	os.Mkdir(src, 0o755)
	f := filepath.Join(src, "f")
	if err := os.WriteFile(f, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	sec := newTestSecondary(t, filepath.Join(top, "peer", "state"))
	p, err := NewPrimary(Dir{Name: "data", Path: src}, sec.addr, testLink, 0, slog.New(slog.NewTextHandler(io.Discard, nil)))
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	k := &gateKernel{ino: inoOf(t, f), second: make(chan struct{}), open: make(chan struct{})}
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	wg.Add(1)
	go func() { defer wg.Done(); p.Run(ctx, k) }()
	defer func() { cancel(); wg.Wait() }()
	var once sync.Once
	openGate := func() { once.Do(func() { close(k.open) }) }
	defer openGate()
	for deadline := time.Now().Add(10 * time.Second); !p.Status().InSync; time.Sleep(5 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("the first full sync did not end within 10 s")
		}
	}

	// write_end of f's first 8 KiB: the record; the size has not moved.
	p.Record(&capture.Record{Seq: 1, Ino: k.ino, Pos: 0, Len: 8192, Kind: capture.KindData}, time.Now())
	select {
	case <-k.second: // the first pass is done, the next waits
	case <-time.After(10 * time.Second):
		t.Fatal("no second pass over f within 10 s: the first did not requeue its bytes")
	}
	// The write copies its pages, moves the size and returns; its fsync
	// begins.
	data := make([]byte, 8192)
	rand.Read(data)
	if err := os.WriteFile(f, data, 0o644); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- p.WaitShipped(ctx, nil, Release{}) }()
	select {
	case err := <-done:
		got, _ := os.ReadFile(filepath.Join(sec.data, "f"))
		if err == nil && !bytes.Equal(got, data) {
			t.Fatalf("fsync returned while the peer held %d of the write's %d bytes: a takeover now loses a durable write", len(got), len(data))
		}
	case <-time.After(time.Second):
	}
	openGate()
	select {
	case err := <-done:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("fsync not released within 10 s of the pass that ships the bytes")
	}
	if got, _ := os.ReadFile(filepath.Join(sec.data, "f")); !bytes.Equal(got, data) {
		t.Fatalf("after the fsync the peer holds %d of the write's %d bytes", len(got), len(data))
	}
}
