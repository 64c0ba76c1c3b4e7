package node

import (
	"context"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/duet-ha/duet/pkg/capture"
	"github.com/duet-ha/duet/pkg/config"
	"github.com/duet-ha/duet/pkg/loopfs"
	"github.com/duet-ha/duet/pkg/peerlink"
	"github.com/duet-ha/duet/pkg/replica"
)

// TestStreamsBeginOnlyOnceTheRoleIsTaken: a term's primaries connect to
// the peer only once serve holds the VIP as well as the capture
// (startStreams). startPrimary ran them at once, beside the VIP's probe:
// the first resync asked for the peer's manifest, which marks the peer's
// copy mid-resync, and a term whose VIP then could not be taken stopped
// with that mark left on a handover's giver, which then could not take
// the role back (a review: the giver mid-resync 7.6 to 9.8 ms after the
// receiver's term began, in pkg/replica). Here the "peer" is a listener
// that counts connections.
func TestStreamsBeginOnlyOnceTheRoleIsTaken(t *testing.T) {
	fs := loopfs.Make(t, "ext4", 64)
	var st syscall.Stat_t
	if err := syscall.Stat(fs.Mount, &st); err != nil {
		t.Fatal(err)
	}
	src := filepath.Join(fs.Mount, "src")
	if err := os.Mkdir(src, 0o755); err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	connected := make(chan struct{}, 16)
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			connected <- struct{}{}
			c.Close()
		}
	}()
	stateDir := t.TempDir()
	ms, err := replica.OpenMeta(stateDir, "data")
	if err != nil {
		t.Fatal(err)
	}
	lk, err := peerlink.New(peerlink.Options{Node: "nodeB", Keys: [][]byte{[]byte("0123456789abcdef")}, Plaintext: true})
	if err != nil {
		t.Fatal(err)
	}
	n := testNode(t, stateDir)
	n.log = slog.New(slog.NewTextHandler(io.Discard, nil))
	n.cfg.Peer = ln.Addr().String()
	n.cfg.Replicate = []config.Replicate{{Name: "data", Path: src}}
	n.dirs = []replica.Dir{{Name: "data", Path: src}}
	n.devs = []uint64{st.Dev}
	n.metas = []*replica.MetaStore{ms}
	n.link = lk
	n.exit = func(int) {}
	n.drained = sync.NewCond(&n.drainMu)
	c, err := capture.Load(n.captureOptions())
	if err != nil {
		t.Skipf("capture: %v", err)
	}
	n.next = &preloaded{done: make(chan struct{}), c: c}
	close(n.next.done)
	ctx, cancel := context.WithCancel(context.Background())
	if err := n.startPrimary(ctx); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		cancel()
		n.stopPrimary()
		n.detaching.Wait()
		if c, err := n.takeCapture(); err == nil {
			c.Close()
		}
	})
	select {
	case <-connected:
		t.Fatal("the term's primary connected to the peer before serve took the VIP (startPrimary runs it): a term that then fails leaves the peer's copy marked mid-resync")
	case <-time.After(500 * time.Millisecond):
	}
	n.startStreams(ctx)
	select {
	case <-connected:
	case <-time.After(10 * time.Second):
		t.Fatal("no connection to the peer 10 s after the streams began")
	}
}
