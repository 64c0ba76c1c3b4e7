package replica

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"sync/atomic"
	"testing"
	"time"
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
