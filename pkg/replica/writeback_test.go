package replica

import (
	"bytes"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/duet-ha/duet/pkg/loopfs"
	"github.com/duet-ha/duet/pkg/wire"
)

// TestBackgroundSyncAfterFailedFlush: the primary's periodic (lazy) sync
// runs in the background; the connection's own flush fails first (the
// disk under the replica fails its writeback) and consumes the error:
// Linux reports a writeback error once to each descriptor opened before
// it, and not at all to one opened after it was seen. A background sync
// that opened its descriptor only then flushed "successfully" and
// acknowledged the batches durable, their pages lost.
func TestBackgroundSyncAfterFailedFlush(t *testing.T) {
	// The replica's directory on the failing disk, its state beside it
	// on a sound one: the state's saves dirty nothing more there.
	dir := t.TempDir()
	loopfs.Failing(t, filepath.Join(dir, "data"))
	s := newTestSecondary(t, filepath.Join(dir, "state"))
	proceed := make(chan struct{})
	release := sync.OnceFunc(func() { close(proceed) })
	t.Cleanup(release)
	s.bgSync = func() { <-proceed }
	p := s.connect(t, 7)
	// 40 MiB in batches of 10 (a batch holds 16 at most).
	chunk := bytes.Repeat([]byte("lost by the disk"), 10<<20/16)
	p.batch(1, wire.Op{Code: wire.OpCreate, Path: "f", Mode: 0o644}, wire.Op{Code: wire.OpWrite, Path: "f", Data: chunk})
	p.ack(1, 0)
	for seq := uint64(2); seq <= 4; seq++ {
		p.batch(seq, wire.Op{Code: wire.OpWrite, Path: "f", Off: (seq - 1) * uint64(len(chunk)), Data: chunk})
		p.ack(seq, 0)
	}
	p.send(&wire.Frame{Type: wire.TypeSync, Seq: 4, Flags: wire.FlagLazy}) // waits in bgSync
	p.send(&wire.Frame{Type: wire.TypeSync, Seq: 4})
	f, err := p.read()
	if err != nil || f.Type != wire.TypeError {
		t.Fatalf("sync of 40 MiB on a disk that takes 24: got %s %q (%v), want a refusal", f.Type, f.Payload, err)
	}
	t.Logf("the flush failed: %s", f.Payload)
	release() // the background sync goes on
	p.c.SetReadDeadline(time.Now().Add(10 * time.Second))
	for {
		f, err := p.read()
		if err != nil {
			t.Logf("then: %v", err)
			break // the connection ended: nothing acknowledged
		}
		t.Logf("then: %s seq %d flags %#x %q", f.Type, f.Seq, f.Flags, f.Payload)
		if f.Type == wire.TypeAck && f.Flags&wire.FlagDurable != 0 {
			t.Fatalf("batch %d acknowledged durable by the background sync after the flush failed", f.Seq)
		}
	}
}
