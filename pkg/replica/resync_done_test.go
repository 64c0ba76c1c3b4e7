package replica

import (
	"os"
	"path/filepath"
	"sync/atomic"
	"testing"
	"time"
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
