package replica

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/duet-ha/duet/pkg/loopfs"
	"github.com/duet-ha/duet/pkg/wire"
)

// TestBackgroundSyncAfterFailedFlush: the primary's periodic (lazy) sync
// runs in the background; a flush of the same filesystem runs first and
// sees the writeback error of the disk under the replica: the
// connection's own flush ("own"), or any other process's syncfs ("other":
// an operator's sync). Linux reports a writeback error to each
// descriptor opened before it, and not at all to one opened after it was
// seen. A background sync that opened its descriptor only then flushed
// "successfully" and acknowledged the batches durable, their pages lost.
func TestBackgroundSyncAfterFailedFlush(t *testing.T) {
	for _, first := range []string{"own", "other"} {
		t.Run(first, func(t *testing.T) {
			dir := t.TempDir()
			data := filepath.Join(dir, "data")
			loopfs.Failing(t, data)
			// The replica's state beside it on a sound disk: its saves
			// dirty nothing more on the failing one.
			s := newTestSecondary(t, filepath.Join(dir, "state"))
			proceed := make(chan struct{})
			release := sync.OnceFunc(func() { close(proceed) })
			t.Cleanup(release)
			s.bgSync = func() { <-proceed }
			p := s.connect(t, 7)
			sendLost(p)
			p.send(&wire.Frame{Type: wire.TypeSync, Seq: 4, Flags: wire.FlagLazy}) // waits in bgSync
			if first == "own" {
				p.send(&wire.Frame{Type: wire.TypeSync, Seq: 4})
				f, err := p.read()
				if err != nil || f.Type != wire.TypeError {
					t.Fatalf("sync of 40 MiB on a disk that takes 24: got %s %q (%v), want a refusal", f.Type, f.Payload, err)
				}
				t.Logf("the flush failed: %s", f.Payload)
			} else if err := syncfsOf(data); err == nil {
				t.Fatal("syncfs of 40 MiB on a disk that takes 24 succeeded")
			} else {
				t.Logf("another process's syncfs failed: %v", err)
			}
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
					t.Fatalf("batch %d acknowledged durable by the background sync after a flush saw the disk fail", f.Seq)
				}
			}
		})
	}
}

// sendLost sends batches 1 to 4, 40 MiB of one file (a batch holds 16 at
// most), and reads their acknowledgements: more than loopfs.Failing's
// disk takes.
func sendLost(p *peerConn) {
	p.t.Helper()
	chunk := bytes.Repeat([]byte("lost by the disk"), 10<<20/16)
	p.batch(1, wire.Op{Code: wire.OpCreate, Path: "f", Mode: 0o644}, wire.Op{Code: wire.OpWrite, Path: "f", Data: chunk})
	p.ack(1, 0)
	for seq := uint64(2); seq <= 4; seq++ {
		p.batch(seq, wire.Op{Code: wire.OpWrite, Path: "f", Off: (seq - 1) * uint64(len(chunk)), Data: chunk})
		p.ack(seq, 0)
	}
}

// TestBackgroundSyncFailureForgetsAtOnce: a background (lazy) sync fails
// while the connection's goroutine is busy (here: in its own flush, which
// hangs); the daemon dies before that goroutine forgets the progress. The
// restarted daemon (same boot: the new descriptors are opened after the
// error was seen, and its flushes succeed) must not resume from the file,
// or the batches whose pages the disk lost are acknowledged durable.
func TestBackgroundSyncFailureForgetsAtOnce(t *testing.T) {
	dir := t.TempDir()
	loopfs.Failing(t, filepath.Join(dir, "data"))
	stateDir := filepath.Join(dir, "state")
	s := newTestSecondary(t, stateDir)
	// The connection's flush hangs (the daemon dies in it); the
	// background sync starts its own once that flush has begun.
	hung, inFlush := make(chan struct{}), make(chan struct{})
	t.Cleanup(func() { close(hung) })
	entered := sync.OnceFunc(func() { close(inFlush) })
	s.syncfs = func(int) error { entered(); <-hung; return nil }
	s.bgSync = func() { <-inFlush }
	p := s.connect(t, 7)
	sendLost(p)
	p.send(&wire.Frame{Type: wire.TypeSync, Seq: 4, Flags: wire.FlagLazy}) // waits for the flush
	p.send(&wire.Frame{Type: wire.TypeSync, Seq: 4})                       // hangs in it
	// The background sync fails on the failing disk and closes the
	// connection.
	p.c.SetReadDeadline(time.Now().Add(20 * time.Second))
	if f, err := p.read(); err == nil {
		t.Fatalf("got %s seq %d flags %#x, want the connection closed by the failed background sync", f.Type, f.Seq, f.Flags)
	} else if errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatal("the background sync did not end the connection in 20 s")
	}
	// The daemon dies now (its goroutine still in the hung flush, with
	// the progress in memory); it restarts and reads the file.
	s2 := newTestSecondary(t, stateDir)
	p = s2.connect(t, 7)
	if p.w.Session == 7 && p.w.Applied >= 1 {
		t.Fatalf("after a failed background sync and a restart the welcome says session %d applied %d: the primary resumes and the lost batches are called durable; want no progress (session 0)",
			p.w.Session, p.w.Applied)
	}
}
