package replica

import (
	"context"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"sync/atomic"
	"testing"
	"time"

	"github.com/duet-ha/duet/pkg/wire"
)

// TestEarlierResyncEndDoesNotEndTheNext: RescanAll during a resync now
// leaves needFull standing (fullAsked), so the build loop starts the next
// resync as soon as the first one's batches are acknowledged, before the
// peer has answered the first one's end (ResyncDone: it syncs first).
// That answer then reached finishResync while the second resync ran: it
// ended the second (rs.Active false), cleared dirty.lost (fullAsked ==
// rsAsked then) and recorded the peer as following this generation with
// nothing untracked (Meta.Base, Untracked 0), before the second resync
// compared anything. A clean stop then saved a bitmap that said nothing
// was lost: the next term trusted it and never compared the file whose
// record was lost. finishResync now ends only a resync that queued its end.
func TestEarlierResyncEndDoesNotEndTheNext(t *testing.T) {
	top := t.TempDir()
	src := filepath.Join(top, "src")
	makeScaleTree(t, src, 20, 2, 5000)
	r := syncedThenStopped(t, src, filepath.Join(top, "peer"))
	// Changed while stopped: the first resync of the next term ships it,
	// so that it queues batches (and its end goes out with them).
	if err := os.WriteFile(filepath.Join(src, "d0000", "f0000001"), []byte("changed while stopped"), 0o644); err != nil {
		t.Fatal(err)
	}
	victim := filepath.Join(src, "d0001", "f0000003")
	var steps atomic.Int32
	var endedEarly atomic.Bool
	reached, release := make(chan struct{}), make(chan struct{})
	r.resyncStep = func(step string) {
		if step == "scanned" && steps.Load() == 0 {
			steps.Store(1)
			// Written after the first resync's scan read it; its record
			// is lost: RescanAll.
			loseRecordOf(t, r.p, victim)
			return
		}
		if step == "asked" && steps.Load() == 1 && r.p.Status().FullSyncs == 1 {
			steps.Store(2)
			st0 := r.p.Status()
			t.Logf("at asked #2: fullsyncs %d resync %+v sent %d", st0.FullSyncs, st0.Resync, st0.Sent)
			// The second resync (RescanAll's) has begun.
			for deadline := time.Now().Add(3 * time.Second); time.Now().Before(deadline); time.Sleep(time.Millisecond) {
				if !r.p.Status().Resync.Active {
					endedEarly.Store(true)
					break
				}
			}
			r.p.mu.Lock()
			lost := r.p.dirty.lost
			r.p.mu.Unlock()
			t.Logf("second resync asked: ended early %v, dirty.lost %v, meta %+v", endedEarly.Load(), lost, r.pms.Get())
			close(reached)
			<-release
		}
	}
	r.startReplica()
	r.startSource()
	select {
	case <-reached:
	case <-time.After(30 * time.Second):
		t.Fatal("no second resync began")
	}
	time.Sleep(4 * r.margin)
	// A clean stop while the second resync runs.
	r.stopServer()
	close(release)
	r.stop()
	if err := r.p.SaveDirty(); err != nil {
		t.Fatal(err)
	}
	r.p.Close()
	markCleanStop(t, r.src, r.pms)
	time.Sleep(2 * r.margin)
	r.resyncStep = nil
	r.startReplica()
	r.startSource()
	r.waitSynced()
	st := r.p.Status()
	r.cleanStop()
	t.Logf("restart resync: mode %s, files compared %d", st.Resync.Mode, st.Resync.FilesCompared)
	if endedEarly.Load() {
		t.Errorf("the first resync's end, acknowledged while the second ran, ended the second (Resync.Active false before it compared anything)")
	}
	sameTrees(t, src, filepath.Join(top, "peer", "data"))
}

// TestEarlierResyncEndAfterNextQueuedItsEnd: the next resync's manifest
// request is written by the resync itself, beside the sender that writes
// the earlier resync's end, so the peer may answer it first; a resync
// that compares little then queues its batches and its end before the
// peer acknowledges the earlier end. finishResync took any acknowledged
// end for the one in progress once that queued its own (PhaseWaiting):
// the resync was recorded as ended (dirty.lost cleared, the peer a
// mirror of this generation) while its batches were not on the peer. It
// now ends only on an acknowledgement that covers its last batch.
func TestEarlierResyncEndAfterNextQueuedItsEnd(t *testing.T) {
	top := t.TempDir()
	src := filepath.Join(top, "src")
	makeScaleTree(t, src, 4, 1, 100)
	state := filepath.Join(top, "state")
	if err := os.MkdirAll(state, 0o755); err != nil {
		t.Fatal(err)
	}
	ms, err := OpenMeta(state, "data")
	if err != nil {
		t.Fatal(err)
	}
	p, err := NewPrimary(Dir{Name: "data", Path: src}, "127.0.0.1:1", testLink, 0, slog.New(slog.NewTextHandler(io.Discard, nil)))
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	if err := p.BeginTerm(Term{Meta: ms, DirtyPath: filepath.Join(state, "bitmap-data"), Margin: 50 * time.Millisecond}); err != nil {
		t.Fatal(err)
	}
	// The second resync queued batches 11 to 20 and its end; the first
	// one's end was batch 10.
	p.mu.Lock()
	p.rs = ResyncStatus{Active: true, Mode: "bitmap", Phase: PhaseWaiting, Started: time.Now()}
	p.fullSyncEnd = 20
	p.dirty.lost = true
	p.sentBound = 20 // the batches were sent
	p.mu.Unlock()
	c, peer := net.Pipe()
	defer c.Close()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	done := make(chan error, 1)
	go func() { done <- p.readAcks(ctx, c, make(chan wire.Frame, 1)) }()
	ack := func(seq uint64) {
		t.Helper()
		if err := wire.WriteFrame(peer, &wire.Frame{Type: wire.TypeAck, Flags: wire.FlagDurable | wire.FlagResyncDone, Seq: seq}); err != nil {
			t.Fatal(err)
		}
	}
	ack(10) // the first resync's end
	ack(10) // any frame after it: readAcks handled the first
	if st := p.Status(); !st.Resync.Active {
		t.Fatalf("the first resync's end (batch 10) ended the second, whose end is batch 20: %+v", st.Resync)
	}
	p.mu.Lock()
	lost := p.dirty.lost
	p.mu.Unlock()
	if !lost {
		t.Fatal("the first resync's end cleared the record of lost changes the second stands for")
	}
	ack(20)
	ack(20)
	if st := p.Status(); st.Resync.Active {
		t.Fatalf("the second resync's own end did not end it: %+v", st.Resync)
	}
	peer.Close()
	<-done
}
