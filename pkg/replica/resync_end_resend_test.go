package replica

import (
	"context"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/duet-ha/duet/pkg/wire"
)

// TestResyncEndResentAfterReconnectBelowIt: a session was lost with
// batches 16..20 unacknowledged (dropped; the sender went on from 20), and
// the resync that followed queued nothing (the files those batches
// changed were equal again): its end is numbered 20. The connection
// dropped before the peer took that frame; the peer, which applied up to
// 15 (= acked), welcomes the next connection with 15, and needFull is
// clear (the resync queued), so the primary resumes from 15. The end is
// sent only once the sender has written a batch numbered 20 or more, and
// none exists: on an idle primary the resync never ends (the peer stays
// inconsistent, unable to take over) until some change makes a batch.
// From a review of 4718526 (failed on it). The end now goes after the
// batches still queued up to it (outbox.pending).
func TestResyncEndResentAfterReconnectBelowIt(t *testing.T) {
	top := t.TempDir()
	src := filepath.Join(top, "src")
	if err := os.MkdirAll(src, 0o755); err != nil {
		t.Fatal(err)
	}
	p, err := NewPrimary(Dir{Name: "data", Path: src}, "127.0.0.1:1", testLink, 0, slog.New(slog.NewTextHandler(io.Discard, nil)))
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	// State after the lost session and the empty resync, as connection()
	// and the resync leave it.
	p.mu.Lock()
	p.out.next = 21 // batches up to 20 numbered; 16..20 dropped
	p.out.acked, p.out.durable = 15, 15
	p.needFull = false
	p.fullSyncEnd = 20
	p.rs = ResyncStatus{Active: true, Mode: "bitmap", Phase: PhaseWaiting, Started: time.Now()}
	p.out.resyncEnds(&wire.Frame{Type: wire.TypeSync, Flags: wire.FlagResyncDone, Seq: 20,
		Payload: wire.AppendResyncDone(nil, &wire.ResyncDone{})})
	// The next connection, as connection() computes it.
	w := wire.Welcome{Session: p.session, Applied: 15}
	resumable := !p.needFull && w.Session == p.session && w.Applied >= p.out.acked
	from := w.Applied
	p.out.connect()
	p.mu.Unlock()
	if !resumable {
		t.Fatal("setup: the connection does not resume")
	}
	c, peer := net.Pipe()
	defer c.Close()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go p.writeBatches(ctx, c, from, false)
	got := make(chan wire.Frame, 1)
	go func() {
		f, err := wire.ReadFrame(peer, nil)
		if err == nil {
			got <- f
		}
	}()
	select {
	case f := <-got:
		if f.Flags&wire.FlagResyncDone == 0 {
			t.Fatalf("first frame on the new connection: %+v", f)
		}
	case <-time.After(2 * time.Second):
		t.Fatal("the resync's end (batch 20) was not sent on a connection resumed from 15 with no batch left to send: the resync cannot end until a new batch is built")
	}
}
