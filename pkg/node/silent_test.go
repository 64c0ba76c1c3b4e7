package node

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/duet-ha/duet/pkg/capture"
	"github.com/duet-ha/duet/pkg/cluster"
	"github.com/duet-ha/duet/pkg/config"
	"github.com/duet-ha/duet/pkg/replica"
	"github.com/duet-ha/duet/pkg/wire"
	"golang.org/x/sys/unix"
)

// How a peerRelay treats what it carries.
const (
	relayOpen     int32 = iota // forwards everything
	relayFrozen                // forwards nothing; connections stay open
	relayAcksLost              // forwards everything but the replica's acks
)

// peerRelay carries a primary's replication connections (plaintext) to
// its replica. Silenced, it is a replica whose disk hung: frozen, it
// forwards nothing (the connections stay open, a new one gets no
// answer); acks lost, it swallows the replica's acks, so that a new
// connection's handshake goes through (the daemon answers, the disk does
// not) and the primary streams again at once.
type peerRelay struct {
	ln    net.Listener
	to    string
	mode  atomic.Int32
	ended atomic.Int32 // connections the primary ended

	mu    sync.Mutex
	conns []net.Conn
	wg    sync.WaitGroup
}

// start listens on the loopback, relaying to the replica at to; it
// returns the address to connect to.
func (r *peerRelay) start(t *testing.T, to string) string {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	r.ln, r.to = ln, to
	r.wg.Add(1)
	go r.serve()
	return ln.Addr().String()
}

func (r *peerRelay) serve() {
	defer r.wg.Done()
	for {
		c, err := r.ln.Accept()
		if err != nil {
			return
		}
		s, err := net.Dial("tcp", r.to)
		if err != nil {
			c.Close()
			continue
		}
		r.mu.Lock()
		r.conns = append(r.conns, c, s)
		r.mu.Unlock()
		r.wg.Add(2)
		go r.fromPrimary(c, s)
		go r.fromReplica(s, c)
	}
}

// fromPrimary forwards the primary's bytes unless frozen, and counts the
// connection as ended by the primary when it closes it.
func (r *peerRelay) fromPrimary(c, s net.Conn) {
	defer r.wg.Done()
	defer s.Close()
	buf := make([]byte, 32<<10)
	for {
		k, err := c.Read(buf)
		if k > 0 && r.mode.Load() != relayFrozen {
			s.Write(buf[:k])
		}
		if err != nil {
			if !errors.Is(err, net.ErrClosed) {
				r.ended.Add(1)
			}
			return
		}
	}
}

// fromReplica forwards the replica's frames, unless frozen, and not its
// acks once they are lost.
func (r *peerRelay) fromReplica(s, c net.Conn) {
	defer r.wg.Done()
	defer c.Close()
	br := bufio.NewReader(s)
	for {
		f, err := wire.ReadFrame(br, nil)
		if err != nil {
			return
		}
		if m := r.mode.Load(); m == relayFrozen || m == relayAcksLost && f.Type == wire.TypeAck {
			continue
		}
		if err := wire.WriteFrame(c, &f); err != nil {
			return
		}
	}
}

func (r *peerRelay) close() {
	r.ln.Close()
	r.mu.Lock()
	for _, c := range r.conns {
		c.Close()
	}
	r.mu.Unlock()
	r.wg.Wait()
}

// syncBuffer is a log destination safe for concurrent use.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// TestBarrierPeerConfirmsNothing: a peer connected and streaming that
// confirms nothing (its disk hung) failed durability calls with EIO after
// barrierTimeout while this node's heartbeats still said "synced": the
// peer stayed an up-to-date SECOND that could take over, and MariaDB,
// which may report a commit whose binary log flush got EIO, lost it then.
// Now the call ends the replication connection (once for the calls of
// one episode), the heartbeats say "not synced" until the peer confirms
// everything (also when a new connection streams at once, as silent),
// and the calls wait until the peer says its copy is stale: then they are
// released alone, or fail with cluster.alone_writes: fail.
func TestBarrierPeerConfirmsNothing(t *testing.T) {
	for _, c := range []struct {
		name        string
		mode        int32
		aloneWrites string
		want        string
	}{
		{"frozen", relayFrozen, config.AloneRelease, "alone"},
		{"acks lost, new connections stream", relayAcksLost, config.AloneRelease, "alone"},
		{"frozen, alone_writes fail", relayFrozen, config.AloneFail, "error: no peer in sync, and cluster.alone_writes is fail"},
	} {
		t.Run(c.name, func(t *testing.T) {
			const calls = 2
			logs := &syncBuffer{}
			n := testNode(t, t.TempDir())
			n.log = slog.New(slog.NewTextHandler(io.MultiWriter(logs, os.Stderr), nil))
			n.metrics = newMetrics(n.Status)
			n.barrierTimeout = 2 * time.Second // beyond a reconnection (500 ms)
			n.cfg.Cluster.Timeout = 1500 * time.Millisecond
			n.cfg.Cluster.AloneWrites = c.aloneWrites
			var err error
			if n.guard, err = newGuard(n.cfg); err != nil {
				t.Fatal(err)
			}
			r := &peerRelay{}
			p, src := streamingPrimaryVia(t, r)
			n.cfg.Replicate = []config.Replicate{{Name: "data", Path: src, Mode: config.ModeSync}}
			n.primaries = []*replica.Primary{p}
			const e = 9
			prim := cluster.Machine{Name: "nodeB", State: cluster.Prim, Epoch: e,
				Peer: cluster.Peer{Seen: true, Name: "nodeA", State: cluster.Second, Epoch: e}}
			if err := n.persist(prim); err != nil { // as serve does
				t.Fatal(err)
			}
			n.machine.Store(&prim)
			if !n.heartbeat().Synced {
				t.Fatal("the heartbeats do not say synced to a streaming peer")
			}

			// The peer's disk hangs; then a change, and durability calls.
			r.mode.Store(c.mode)
			if err := os.WriteFile(filepath.Join(src, "commit"), []byte("row 1"), 0o644); err != nil {
				t.Fatal(err)
			}
			var st unix.Stat_t
			if err := unix.Stat(src, &st); err != nil {
				t.Fatal(err)
			}
			p.Rescan(capture.InodeKey{Ino: st.Ino}) // its directory reports the new file
			start := time.Now()
			res := make(chan string, calls)
			for range calls {
				go func() { res <- n.barrier(context.Background()) }()
			}

			// Held while the peer is an up-to-date SECOND, and the
			// connection ended.
			for deadline := start.Add(3 * n.barrierTimeout); r.ended.Load() == 0; time.Sleep(5 * time.Millisecond) {
				select {
				case got := <-res:
					t.Fatalf("a call answered %q after %s while the peer, heard as an up-to-date SECOND, confirmed nothing: "+
						"it could take over without the change (want the connection ended and the call held)", got, time.Since(start).Round(time.Millisecond))
				default:
				}
				if time.Now().After(deadline) {
					t.Fatalf("the replication connection not ended %s after the calls began", time.Since(start).Round(time.Millisecond))
				}
			}
			if c.mode == relayAcksLost {
				waitFor(t, "the primary streams again, to a replica that still confirms nothing", p.Streaming)
			}
			if n.heartbeat().Synced {
				t.Fatal("the heartbeats say synced to a peer that confirmed nothing: it stays an up-to-date SECOND")
			}
			select {
			case got := <-res:
				t.Fatalf("a call answered %q while the peer could still take over", got)
			default:
			}

			// The peer heard it, marked its copy stale and says so.
			n.machine.Store(&cluster.Machine{Name: "nodeB", State: cluster.Prim, Epoch: e,
				Peer: cluster.Peer{Seen: true, Name: "nodeA", State: cluster.Wait, Epoch: e, Stale: true,
					EchoBoot: n.guard.Boot(), EchoTime: hbClock()}})
			n.wakePrimaries()
			for range calls {
				select {
				case got := <-res:
					if got != c.want {
						t.Errorf("once the peer's copy is stale, a call answered %q, want %q", got, c.want)
					}
				case <-time.After(2 * n.barrierTimeout):
					t.Fatal("a call still held after the peer said its copy is stale")
				}
			}
			if k := strings.Count(logs.String(), "the peer confirmed nothing for 2s: ending the replication connection"); k != 1 {
				t.Errorf("the connection's end logged %d times for %d calls of one episode, want once", k, calls)
			}
			if !strings.Contains(logs.String(), "dir=data") {
				t.Error("the log does not name the directory")
			}
		})
	}
}
