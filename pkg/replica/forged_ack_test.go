package replica

import (
	"context"
	"io"
	"log/slog"
	"math"
	"net"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/duet-ha/duet/pkg/wire"
)

// From a security review (forty-second session): a peer (hostile, holding
// the cluster key, or anyone on the path with insecure_plaintext_link)
// acknowledges a batch it was never sent. Taken, the ack dropped the
// batches never sent from the outbox and counted them durable for the rest
// of the term, honest peers' later sessions included; flagged resync-done,
// it ended a resync whose batches were still queued and recorded the peer
// as a mirror. Each case failed on 7f8fbb8.
func TestForgedAckBeyondSentRefused(t *testing.T) {
	for _, tc := range []struct {
		name  string
		seq   uint64
		flags uint16
	}{
		{"beyond every batch built", math.MaxUint64, wire.FlagDurable},
		{"built, not sent", 20, wire.FlagDurable},
		{"resync done, beyond", math.MaxUint64, wire.FlagDurable | wire.FlagResyncDone},
		{"resync done, built, not sent", 20, wire.FlagDurable | wire.FlagResyncDone},
	} {
		t.Run(tc.name, func(t *testing.T) {
			top := t.TempDir()
			src := filepath.Join(top, "src")
			makeScaleTree(t, src, 1, 1, 1)
			p, err := NewPrimary(Dir{Name: "data", Path: src}, "127.0.0.1:1", testLink, 0, slog.New(slog.NewTextHandler(io.Discard, nil)))
			if err != nil {
				t.Fatal(err)
			}
			defer p.Close()
			mirror := false
			p.OnResyncDone = func() { mirror = true }
			// A resync queued batches 1 to 20 and its end; the sender
			// wrote up to 5.
			p.mu.Lock()
			for range 20 {
				p.out.push(sentBatch{seq: p.out.number(), frame: []byte("x"), since: time.Now()})
			}
			p.rs = ResyncStatus{Active: true, Mode: "full", Phase: PhaseWaiting, Started: time.Now()}
			p.fullSyncEnd = 20
			p.dirty.lost = true
			p.sentBound = 5
			p.mu.Unlock()
			c, peer := net.Pipe()
			defer c.Close()
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			done := make(chan error, 1)
			go func() { done <- p.readAcks(ctx, c, make(chan wire.Frame, 1)) }()
			go func() {
				for range 2 { // the second is read only once the first was handled
					if wire.WriteFrame(peer, &wire.Frame{Type: wire.TypeAck, Flags: tc.flags, Seq: tc.seq}) != nil {
						return
					}
				}
				peer.Close()
			}()
			err = <-done
			if err == nil || !strings.Contains(err.Error(), "beyond the last sent") {
				t.Errorf("readAcks ended with %v, want the forged ack named as a protocol error", err)
			}
			p.mu.Lock()
			queued, durable, acked := len(p.out.batches), p.out.durable, p.out.acked
			p.mu.Unlock()
			if queued != 20 || durable != 0 || acked != 0 {
				t.Errorf("after an ack of batch %d (5 sent): %d of 20 batches still queued, durable %d, acked %d; want all queued, nothing acknowledged", tc.seq, queued, durable, acked)
			}
			if st := p.Status(); !st.Resync.Active || mirror {
				t.Errorf("the ack ended the resync whose batches were not sent: active %v, peer recorded as a mirror %v", st.Resync.Active, mirror)
			}
		})
	}
}

// TestWelcomeBeyondBuiltNotResumed: a peer whose welcome says it applied,
// in this session, batches never built here is not resumed from there: the
// primary took its word (acked every batch up to it, and the sender skipped
// them all) and compares the trees instead now.
func TestWelcomeBeyondBuiltNotResumed(t *testing.T) {
	top := t.TempDir()
	src := filepath.Join(top, "src")
	makeScaleTree(t, src, 1, 1, 1)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	p, err := NewPrimary(Dir{Name: "data", Path: src}, ln.Addr().String(), testLink, 0, slog.New(slog.NewTextHandler(io.Discard, nil)))
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	p.mu.Lock()
	for range 3 {
		p.out.push(sentBatch{seq: p.out.number(), frame: []byte("x"), since: time.Now()})
	}
	p.needFull = false
	session := p.session
	p.mu.Unlock()
	go fakePeer(ln, wire.Welcome{Session: session, Applied: 1000}, func(c net.Conn) { io.Copy(io.Discard, c) })
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); p.Run(ctx, nil) }()
	defer func() { cancel(); <-done }()
	for deadline := time.Now().Add(20 * time.Second); ; time.Sleep(10 * time.Millisecond) {
		p.mu.Lock()
		connected, acked := p.connected, p.out.acked
		p.mu.Unlock()
		if acked >= 1000 {
			t.Fatalf("a welcome saying batch 1000 applied (3 built) was resumed: acked %d", acked)
		}
		if connected {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the primary did not connect")
		}
	}
	p.mu.Lock()
	bound := p.sentBound
	p.mu.Unlock()
	if bound > 3 {
		t.Errorf("the peer may acknowledge up to batch %d; 3 were built", bound)
	}
}

// TestPeerRefusalCut: the peer's reason for refusing a batch is kept in
// the status and logged at each retry; a frame may carry 64 MiB of it.
func TestPeerRefusalCut(t *testing.T) {
	long := strings.Repeat("x", 1<<20)
	got := refusal([]byte(long))
	if len(got) > maxRefusal+64 || !strings.HasSuffix(got, "(1048576 bytes)") {
		t.Errorf("a 1 MiB reason kept as %d bytes ending %q", len(got), got[max(0, len(got)-32):])
	}
	if got := refusal([]byte("disk full")); got != "disk full" {
		t.Errorf("a short reason kept as %q", got)
	}
}

// TestPeerManifestBounded: a peer (it holds the cluster key) answers the
// primary's manifest request with frame after frame of entries. Each frame
// is bounded, their number was not: the primary kept every entry until the
// end that never came, a few hundred KiB on the wire pinning hundreds of
// MiB (a security review, forty-second session). The resync now fails at
// peerEntriesLimit, naming it.
func TestPeerManifestBounded(t *testing.T) {
	defer func(f int) { peerEntriesFloor = f }(peerEntriesFloor)
	peerEntriesFloor = 1000
	top := t.TempDir()
	src := filepath.Join(top, "src")
	makeScaleTree(t, src, 1, 1, 1)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	var raw []byte
	for range 999 {
		raw = wire.AppendEntry(raw, &wire.Entry{Path: "a", Mode: 0o644, Ino: 1})
	}
	payload := wire.Compress(nil, raw)
	sent := make(chan int, 1)
	go fakePeer(ln, wire.Welcome{}, func(tc net.Conn) {
		for {
			f, err := wire.ReadFrame(tc, nil)
			if err != nil {
				return
			}
			if f.Type != wire.TypeManifestQ {
				continue
			}
			n := 0
			for range 5 {
				if wire.WriteFrame(tc, &wire.Frame{Type: wire.TypeManifest, Flags: wire.FlagZstd, Seq: f.Seq, Payload: payload}) != nil {
					break
				}
				n++
			}
			sent <- n
			io.Copy(io.Discard, tc) // no end: the primary waits for more
			return
		}
	})
	p, err := NewPrimary(Dir{Name: "data", Path: src}, ln.Addr().String(), testLink, 0, slog.New(slog.NewTextHandler(io.Discard, nil)))
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); p.Run(ctx, nil) }()
	defer func() { cancel(); <-done }()
	select {
	case <-sent:
	case <-time.After(60 * time.Second):
		t.Fatal("the primary never asked for the manifest")
	}
	for deadline := time.Now().Add(20 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		if e := p.Status().LastError; strings.Contains(e, "more than 1000 entries") {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("5 manifest frames of 999 entries (limit 1000) and no end: the primary still waits for more; last error %q", p.Status().LastError)
		}
	}
}

// fakePeer accepts one connection on ln, completes the replication
// handshake as a secondary that welcomes with w, then hands the link to
// serve.
func fakePeer(ln net.Listener, w wire.Welcome, serve func(net.Conn)) {
	c, err := ln.Accept()
	if err != nil {
		return
	}
	defer c.Close()
	tc, err := testLink.Server(context.Background(), c)
	if err != nil {
		return
	}
	if _, err := wire.ServerHandshake(tc, testLink.Keys(), func(wire.Hello) wire.Welcome { return w }); err != nil {
		return
	}
	serve(tc)
}
