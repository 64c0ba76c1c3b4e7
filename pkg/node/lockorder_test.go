package node

import (
	"context"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/duet-ha/duet/pkg/capture"
	"github.com/duet-ha/duet/pkg/cluster"
	"github.com/duet-ha/duet/pkg/peerlink"
	"github.com/duet-ha/duet/pkg/replica"
)

// noKernel is a capture side with nothing captured.
type noKernel struct{}

func (noKernel) ForgetChunks([]capture.CaptureChunkKey) error { return nil }
func (noKernel) ForgetAttr(capture.InodeKey)                  {}
func (noKernel) Drain() error                                 { return nil }
func (noKernel) Seq() uint64                                  { return 0 }

// streamingPrimary is a Primary of an empty directory streaming to a
// replica on the loopback.
func streamingPrimary(t *testing.T) *replica.Primary {
	p, _ := streamingPrimaryVia(t, nil)
	return p
}

// streamingPrimaryVia is streamingPrimary whose connections go through
// relay r (nil: straight to the replica); it returns the primary's
// directory too.
func streamingPrimaryVia(t *testing.T, r *peerRelay) (*replica.Primary, string) {
	t.Helper()
	top := t.TempDir()
	src, dst := filepath.Join(top, "src"), filepath.Join(top, "dst")
	os.Mkdir(src, 0o755)
	os.Mkdir(dst, 0o755)
	lk, err := peerlink.New(peerlink.Options{Node: "test", Keys: [][]byte{[]byte("0123456789abcdef")}, Plaintext: true})
	if err != nil {
		t.Fatal(err)
	}
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	srv := &replica.Server{Link: lk, StateDir: filepath.Join(top, "state"), Dirs: []replica.Dir{{Name: "data", Path: dst}}, Log: log}
	srv.SetAccept(true)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	if r != nil {
		addr = r.start(t, addr)
	}
	p, err := replica.NewPrimary(replica.Dir{Name: "data", Path: src}, addr, lk, 0, log)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	wg.Add(2)
	go func() { defer wg.Done(); srv.Serve(ctx, ln) }()
	go func() { defer wg.Done(); p.Run(ctx, noKernel{}) }()
	t.Cleanup(func() {
		if r != nil {
			r.close() // a handshake held by the relay would hold Run
		}
		cancel()
		wg.Wait()
		srv.Close(10 * time.Second)
		p.Close()
	})
	waitFor(t, "the primary streams", p.Streaming)
	return p, src
}

// blockedIn reports whether a goroutine waits for a lock (state) in fn.
func blockedIn(state, fn string) bool {
	buf := make([]byte, 1<<20)
	buf = buf[:runtime.Stack(buf, true)]
	for _, g := range strings.Split(string(buf), "\n\n") {
		header, _, _ := strings.Cut(g, "\n")
		if strings.Contains(header, "["+state) && strings.Contains(g, fn) {
			return true
		}
	}
	return false
}

// TestHeartbeatTakesNoServeLockUnderRelMu: a waiting durability call
// takes relMu under its Primary's lock (Release.Now), and wakePrimaries
// or a Drop holds smu while it takes that lock. A heartbeat that waited
// for smu while it held relMu (to start a catch-up) closed the circle
// as soon as a writer queued for smu (a role change): the daemon hung,
// its heartbeats and durability calls with it. The heartbeat may wait
// for relMu, not hold it while it waits for smu.
func TestHeartbeatTakesNoServeLockUnderRelMu(t *testing.T) {
	n := testNode(t, t.TempDir())
	n.cfg.Cluster.Timeout = 1500 * time.Millisecond
	var err error
	if n.guard, err = newGuard(n.cfg); err != nil {
		t.Fatal(err)
	}
	n.primaries = []*replica.Primary{streamingPrimary(t)}
	n.machine.Store(&cluster.Machine{Name: "nodeB", State: cluster.Prim})
	n.releasedAlone.Store(true) // a call went on without the peer
	n.catchingUp.Store(true)    // and its catch-up runs

	n.relMu.Lock() // a release in progress
	done := make(chan cluster.Heartbeat, 1)
	go func() { done <- n.heartbeat() }()
	waitFor(t, "the heartbeat waits for relMu", func() bool { return blockedIn("sync.Mutex.Lock", "(*Node).heartbeat") })
	// Something holds smu and waits (for a Primary's lock), and a role
	// change queues for smu.
	n.smu.RLock()
	writer := make(chan struct{})
	go func() {
		n.smu.Lock()
		close(writer) // the writer had its turn at the lock
		n.smu.Unlock()
	}()
	waitFor(t, "the writer queues for smu", func() bool { return blockedIn("sync.RWMutex.Lock", "TestHeartbeatTakesNoServeLockUnderRelMu") })
	n.relMu.Unlock()
	select {
	case h := <-done:
		if h.Synced {
			t.Error("the heartbeat says synced while a call released without the peer is not shipped")
		}
	case <-time.After(5 * time.Second):
		held := !n.relMu.TryLock()
		n.smu.RUnlock()
		<-writer
		<-done
		t.Fatalf("the heartbeat did not return while smu was wanted by a writer (relMu held meanwhile: %v): a call waiting for relMu under its Primary's lock closes a deadlock", held)
	}
	n.smu.RUnlock()
	<-writer
}
