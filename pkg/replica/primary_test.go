package replica

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"sync/atomic"
	"testing"
	"time"
	"weak"

	"github.com/duet-ha/duet/pkg/wire"
)

// A durability call without the peer is released only once the cluster
// says the peer cannot take over (Release.Now), however long the link is
// down: released earlier, the change could be lost by a takeover of a
// peer that never got it.
func TestWaitShippedHeldUntilPeerCannotTakeOver(t *testing.T) {
	p := unconnectedPrimary(t)
	var lost atomic.Bool
	done := make(chan error, 1)
	go func() {
		done <- p.WaitShipped(context.Background(), nil, Release{Now: lost.Load})
	}()
	select {
	case err := <-done:
		t.Fatalf("released while the peer could still take over: %v", err)
	case <-time.After(300 * time.Millisecond):
	}
	lost.Store(true)
	p.Wake()
	select {
	case err := <-done:
		if !errors.Is(err, ErrAlone) {
			t.Fatalf("got %v, want ErrAlone", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("not released 5 s after the peer was declared lost")
	}
}

// A node leaving its role gives up on a peer that stays away for
// Release.After.
func TestWaitShippedReleasedAfter(t *testing.T) {
	p := unconnectedPrimary(t)
	start := time.Now()
	err := p.WaitShipped(context.Background(), nil, Release{After: 200 * time.Millisecond})
	if !errors.Is(err, ErrAlone) || time.Since(start) < 200*time.Millisecond {
		t.Fatalf("got %v after %s, want ErrAlone after 200ms", err, time.Since(start))
	}
}

// A call still held when the node leaves the role (Close) fails at once:
// the node no longer serves, and nothing would wake it but its timeout
// (30 s of a writer waiting on a node that is no longer the primary).
func TestWaitShippedFailsWhenClosed(t *testing.T) {
	p := unconnectedPrimary(t)
	done := make(chan error, 1)
	go func() {
		done <- p.WaitShipped(context.Background(), nil, Release{Now: func() bool { return false }})
	}()
	select {
	case err := <-done:
		t.Fatalf("ended before the primary was closed: %v", err)
	case <-time.After(200 * time.Millisecond):
	}
	p.Close()
	select {
	case err := <-done:
		if !errors.Is(err, ErrClosed) {
			t.Fatalf("got %v, want ErrClosed", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("still held 5 s after the primary was closed")
	}
}

// unconnectedPrimary is a Primary of a temporary directory whose peer
// never answers.
func unconnectedPrimary(t *testing.T) *Primary {
	t.Helper()
	p, err := NewPrimary(Dir{Name: "data", Path: t.TempDir()}, "127.0.0.1:1", testLink, 0,
		slog.New(slog.NewTextHandler(io.Discard, nil)))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { p.Close() })
	return p
}

// A pass that reads more than maxUnacked (a resync reads the whole tree)
// waits for the peer's acknowledgements: without them the queue held
// everything it read, gigabytes for a large tree on a slower link. The
// wait ends with the acknowledgements, or with the connection.
func TestBatcherWaitsForThePeer(t *testing.T) {
	p := unconnectedPrimary(t)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	bt := &batcher{p: p, ctx: ctx}
	flushed := func() <-chan struct{} {
		done := make(chan struct{})
		go func() {
			bt.add(&wire.Op{Code: wire.OpMkdir, Path: "d", Mode: 0o755})
			bt.flush()
			close(done)
		}()
		return done
	}
	p.mu.Lock()
	p.out.bytes = maxUnacked // what earlier batches left unacknowledged
	p.mu.Unlock()
	done := flushed()
	select {
	case <-done:
		t.Fatalf("a batch was queued beyond maxUnacked without waiting: %d bytes unacknowledged", p.Status().UnackedBytes)
	case <-time.After(200 * time.Millisecond):
	}
	p.mu.Lock()
	p.ack(p.out.next - 1)
	p.out.bytes -= maxUnacked
	p.mu.Unlock()
	p.wake()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		t.Fatal("still waiting 5 s after the peer acknowledged everything")
	}

	p.mu.Lock()
	p.out.bytes = maxUnacked
	p.mu.Unlock()
	done = flushed()
	cancel()
	p.wake()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		t.Fatal("still waiting 5 s after the connection ended")
	}
}

// FetchManifest reports each manifest frame as it arrives, so that duet
// verify can show a large tree's progress instead of minutes of silence:
// the counts grow frame by frame and end at the whole manifest.
func TestFetchManifestProgress(t *testing.T) {
	s := newTestSecondary(t, filepath.Join(t.TempDir(), "state"))
	// Long names fill a frame (manifestFrame bytes of entries) with few
	// files: enough of them for at least three frames.
	long := strings.Repeat("n", 240)
	files := 3 * manifestFrame / len(long)
	for i := range files {
		if err := os.WriteFile(filepath.Join(s.data, fmt.Sprintf("%s%05d", long, i)), []byte("some content"), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	type call struct {
		entries int
		bytes   uint64
	}
	var calls []call
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	got, err := FetchManifest(ctx, testLink, s.addr, "data", func(entries int, bytes uint64) {
		calls = append(calls, call{entries, bytes})
	})
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != files+1 {
		t.Fatalf("manifest of %d entries, want %d files and the root", len(got), files)
	}
	var total uint64
	for _, e := range got {
		total += e.Size
	}
	if len(calls) < 3 {
		t.Fatalf("progress called %d times (%v), want once per frame, at least 3", len(calls), calls)
	}
	for i := 1; i < len(calls); i++ {
		if calls[i].entries <= calls[i-1].entries || calls[i].bytes <= calls[i-1].bytes {
			t.Errorf("call %d: %+v after %+v, want both counts growing", i, calls[i], calls[i-1])
		}
	}
	if last := calls[len(calls)-1]; last != (call{len(got), total}) {
		t.Errorf("last call %+v, want the whole manifest: %d entries, %d bytes", last, len(got), total)
	}
}

// The frames of acknowledged batches are garbage at once: the queue's
// array must not keep them. It did (the queue was resliced past them)
// until an append outgrew the array: in an initial sync of a million
// files 125 MB of frames were live where maxUnacked allows 64 MiB.
func TestAckedFramesLetGo(t *testing.T) {
	p := unconnectedPrimary(t)
	const n, size = 16, 1 << 20
	var frames []weak.Pointer[byte]
	p.mu.Lock()
	for i := range n {
		f := make([]byte, size)
		frames = append(frames, weak.Make(&f[0]))
		p.out.batches = append(p.out.batches, sentBatch{seq: uint64(i + 1), frame: f})
		p.out.bytes += len(f)
	}
	p.ack(n - 1) // all but the last
	p.mu.Unlock()
	runtime.GC()
	runtime.GC()
	kept := 0
	for _, w := range frames[:n-1] {
		if w.Value() != nil {
			kept++
		}
	}
	if kept > 0 {
		t.Errorf("%d of %d acknowledged frames are still live after a collection: the queue keeps them", kept, n-1)
	}
	if frames[n-1].Value() == nil {
		t.Error("the frame not acknowledged was collected: the queue lost it")
	}
	p.mu.Lock()
	if len(p.out.batches) != 1 || p.out.bytes != size {
		t.Errorf("after the ack: %d batches, %d bytes queued; want 1 and %d", len(p.out.batches), p.out.bytes, size)
	}
	p.mu.Unlock()
}
