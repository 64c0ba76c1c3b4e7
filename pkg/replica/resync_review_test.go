package replica

import (
	"context"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/duet-ha/duet/pkg/capture"
	"github.com/duet-ha/duet/pkg/journal"
	"golang.org/x/sys/unix"
)

// TestRescanAllDuringResyncIsKept: the capture loses whole-tree records
// (ctr.Rescan: takeOverflow calls RescanAll) while a resync runs, after its
// scan read the file the lost record was about. RescanAll asks for a
// comparison of every file (needFull, forceAll, dirty.lost); the resync
// that was already running cleared needFull and forceAll when it queued
// its end (resyncQueued), and finishResync cleared dirty.lost: nothing
// ever compared the file again, and the peer was reported in sync without
// the change. A request made after a resync planned now outlives it
// (fullAsked).
func TestRescanAllDuringResyncIsKept(t *testing.T) {
	top := t.TempDir()
	src := filepath.Join(top, "src")
	makeScaleTree(t, src, 20, 2, 5000)
	r := syncedThenStopped(t, src, filepath.Join(top, "peer"))
	victim := filepath.Join(src, "d0001", "f0000003")
	fired := false
	r.resyncStep = func(step string) {
		if step != "scanned" || fired {
			return
		}
		fired = true
		// Written after the scan read it; its record is lost with the
		// overflow, and takeOverflow asks for a comparison of every file.
		loseRecordOf(t, r.p, victim)
	}
	r.startReplica()
	r.startSource()
	r.waitSynced()
	st := r.p.Status()
	r.cleanStop()
	if !fired {
		t.Fatal("the resync did not scan")
	}
	t.Logf("in sync after %d resync(s), last mode %q, bitmap trusted %v", st.FullSyncs, st.Resync.Mode, st.BitmapTrusted)
	sameTrees(t, src, filepath.Join(top, "peer", "data"))
}

// loseRecordOf changes victim as a write whose capture record is lost
// would: the bytes change, and the primary is told records were lost
// (RescanAll, what takeOverflow calls).
func loseRecordOf(t *testing.T, p *Primary, victim string) {
	f, err := os.OpenFile(victim, os.O_WRONLY, 0)
	if err != nil {
		t.Error(err)
		return
	}
	f.WriteAt([]byte("LOST RECORD"), 100)
	f.Close()
	p.RescanAll()
}

// TestFailbackReportSurvivesInterruptedResync: a returning old primary (its
// copy was the source, with a file made after its sync point that its peer
// never got) is resynced from the node that took over. The first resync's
// batches are applied (the file is removed), but the resync does not end:
// the replica's flush at its end fails (a daemon killed there, or a cut
// connection, is the same). The report of what it discarded travels only
// in the resync's end (ResyncDone), so it was lost; the next resync found
// the copies equal where the divergent file was and reported nothing. The
// change was discarded and never reported. The lines of a resync that did
// not end are now carried into the next one's report.
func TestFailbackReportSurvivesInterruptedResync(t *testing.T) {
	top := t.TempDir()
	treeA := filepath.Join(top, "src")
	makeScaleTree(t, treeA, 20, 2, 5000)
	r := syncedThenStopped(t, treeA, filepath.Join(top, "peer"))
	treeB := filepath.Join(top, "peer", "data")
	stateA := filepath.Join(top, "state")
	// A (the old source) had a sync point just now; after it, it made a
	// file its peer never got, then went away. B takes over.
	if err := r.pms.Update(func(m *Meta) { m.SyncTime = time.Now().UnixNano() }); err != nil {
		t.Fatal(err)
	}
	time.Sleep(2 * r.margin)
	aOnly := filepath.Join(treeA, "d0000", "a-only")
	if err := os.WriteFile(aOnly, []byte("written on A, never shipped"), 0o644); err != nil {
		t.Fatal(err)
	}
	// A returns as the replica (its meta says Source).
	msA, err := OpenMeta(stateA, "data")
	if err != nil {
		t.Fatal(err)
	}
	if m := msA.Get(); !m.Source {
		t.Fatalf("A's copy state: %+v, want Source", m)
	}
	var failed atomic.Bool
	s := &Server{Link: testLink, StateDir: stateA, Dirs: []Dir{{Name: "data", Path: treeA}}, Log: r.log,
		Metas: map[string]*MetaStore{"data": msA}}
	s.syncfs = func(fd int) error {
		if _, err := os.Stat(aOnly); os.IsNotExist(err) && !failed.Swap(true) {
			return unix.EIO // the resync's end is never recorded
		}
		return unix.Syncfs(fd)
	}
	s.SetAccept(true)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go s.Serve(ctx, ln)
	defer s.Close(5 * time.Second)
	// B is the source now.
	msB, err := OpenMeta(filepath.Join(top, "peer", "state"), "data")
	if err != nil {
		t.Fatal(err)
	}
	p, err := NewPrimary(Dir{Name: "data", Path: treeB}, ln.Addr().String(), testLink, 0, r.log)
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	if err := p.BeginTerm(Term{Meta: msB, DirtyPath: filepath.Join(top, "peer", "state", "bitmap-data"), Margin: r.margin}); err != nil {
		t.Fatal(err)
	}
	pctx, pcancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); p.Run(pctx, nil) }()
	defer func() { pcancel(); <-done }()
	nudged := false
	for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(time.Millisecond) {
		st := p.Status()
		if failed.Load() && st.InSync && !st.Resync.Active && msA.Get().Consistent {
			break
		}
		if failed.Load() && st.FullSyncs >= 2 && !nudged {
			// A write on B after the second resync is queued: a batch
			// for this session, so that its end is sent (see
			// TestEmptyResyncAfterLostSessionEnds).
			nudged = true
			nudge := filepath.Join(treeB, "d0001", "f0000001")
			if err := os.WriteFile(nudge, []byte("written on B"), 0o644); err != nil {
				t.Fatal(err)
			}
			var st unix.Stat_t
			if err := unix.Stat(nudge, &st); err != nil {
				t.Fatal(err)
			}
			p.Record(&capture.Record{Seq: 1, Ino: st.Ino, Pos: 0, Len: uint64(st.Size), Kind: capture.KindData}, time.Now())
			p.Record(&capture.Record{Seq: 2, Ino: st.Ino, Pos: uint64(st.Size), Len: journal.Unbounded, Kind: capture.KindData}, time.Now())
		}
		if time.Now().After(deadline) {
			t.Fatalf("no resync ended after the interrupted one: failed=%v %+v", failed.Load(), st)
		}
	}
	if _, err := os.Stat(aOnly); !os.IsNotExist(err) {
		t.Fatalf("A's divergent file was kept (merged): %v", err)
	}
	reports, _ := filepath.Glob(filepath.Join(stateA, "discarded-*"))
	var all []byte
	for _, f := range reports {
		b, _ := os.ReadFile(f)
		all = append(all, b...)
	}
	if !strings.Contains(string(all), "d0000/a-only") {
		t.Fatalf("d0000/a-only was discarded from A's copy and is in no report (%d report files: %q)", len(reports), all)
	}
}

// TestEmptyResyncAfterLostSessionEnds: a source that shipped batches in a
// session its peer lost (the replica's host rebooted: its progress file is
// discarded) resyncs it on the next connection. Nothing changed meanwhile,
// so that resync queues no batch; its end (ResyncDone) is numbered with the
// last batch of the lost session (out.last()), but the new connection's
// sender starts from 0 and writes the end only once a batch up to that
// number is written on it: none ever was until something changed. The
// peer stayed marked inconsistent (the manifest request marked it) and
// never became in sync: on an idle primary, it could not take over. A lost
// session's sender now starts past the last batch numbered.
func TestEmptyResyncAfterLostSessionEnds(t *testing.T) {
	top := t.TempDir()
	src := filepath.Join(top, "src")
	makeScaleTree(t, src, 20, 2, 5000)
	r := &restartPair{tb: t, src: src, top: filepath.Join(top, "peer"), margin: 50 * time.Millisecond,
		log: slog.New(slog.NewTextHandler(io.Discard, nil))}
	r.startReplica()
	r.startSource()
	defer r.stop()
	r.waitSynced()
	if st := r.p.Status(); st.Sent == 0 {
		t.Fatalf("the first sync shipped no batch: %+v", st)
	}
	// The replica's host reboots: its progress is discarded (boot id).
	r.stopServer()
	if err := os.Remove(filepath.Join(top, "peer", "state", "replica-data.state")); err != nil {
		t.Fatal(err)
	}
	r.startReplica()
	defer r.stopServer()
	deadline := time.Now().Add(10 * time.Second)
	for {
		st := r.p.Status()
		if st.FullSyncs >= 2 && !st.Resync.Active && r.sms.Get().Consistent {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("the resync after the lost session never ended: resync %+v, replica copy state %+v", st.Resync, r.sms.Get())
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// TestChangeBetweenCaptureStopAndBitmapSave: at a clean stop the node
// stops reading capture (stopPrimary: cancel, stopReading) and saves the
// bitmap only once the term's goroutines are gone (serveWG.Wait, then
// SaveDirty): a resync in progress holds that up for as long as it sums
// the files it queued (localSums.wait and sumCompared do not look at the
// context). A change made in between is in no record; the next term took
// the bitmap file's mtime as the start of what nothing captured
// (BeginTerm: untracked), so a change older than that mtime - margin was
// trusted to the bitmap, which does not hold it. SaveDirty now records
// when Run's context ended (Meta.Untracked).
func TestChangeBetweenCaptureStopAndBitmapSave(t *testing.T) {
	top := t.TempDir()
	src := filepath.Join(top, "src")
	makeScaleTree(t, src, 20, 2, 5000)
	r := &restartPair{tb: t, src: src, top: filepath.Join(top, "peer"), margin: 50 * time.Millisecond,
		log: slog.New(slog.NewTextHandler(io.Discard, nil))}
	time.Sleep(2 * r.margin)
	r.startReplica()
	r.startSource()
	r.waitSynced()
	r.stopServer()
	r.stop() // the term ends: capture no longer read
	// A writer changes a file in place (same size) while the stop waits
	// for the term's goroutines.
	victim := filepath.Join(src, "d0000", "f0000002")
	f, err := os.OpenFile(victim, os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteAt([]byte("WRITTEN AFTER CAPTURE STOPPED"), 0); err != nil {
		t.Fatal(err)
	}
	f.Close()
	time.Sleep(4 * r.margin) // the wait, longer than the margin
	if err := r.p.SaveDirty(); err != nil {
		t.Fatal(err)
	}
	r.p.Close()
	markCleanStop(t, src, r.pms)
	time.Sleep(2 * r.margin)
	st := r.restartWindow()
	t.Logf("restart resync: mode %s, files compared %d", st.Resync.Mode, st.Resync.FilesCompared)
	sameTrees(t, src, filepath.Join(top, "peer", "data"))
}
