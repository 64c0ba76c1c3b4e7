package replica

import (
	"context"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/duet-ha/duet/pkg/capture"
	"github.com/duet-ha/duet/pkg/wire"
	"golang.org/x/sys/unix"
)

// TestResyncPassMarkClearsKeptJournalChange (review s46): a resync drops
// from the journal only the settled changes (DropSettled); a file written
// through a shared mapping (Writeback), an operation in progress (preops)
// or bytes not yet visible (Retries) stay in the journal, for a pass after
// the resync to ship: what the resync read of them may be older than what
// that pass reads (stores to a dirty mapped page emit no record). Yet the
// resync records a pass mark covering every change counted up to its start
// (resyncQueued: marks.addPass(run.mark)) and a file mark for every file it
// shipped (fileShipped), so once the resync's batches are durable the
// bitmap forgets those changes, while the pass that really ships them is
// not durable yet. If that session is then lost (the peer restarts), the
// change is in no journal entry and no bitmap mark: the next resync trusts
// the bitmap, finds the file unchanged (same size), and sends nothing.
// The peer keeps the bytes the first resync read; the primary has others.
func TestResyncPassMarkClearsKeptJournalChange(t *testing.T) {
	p := unconnectedPrimary(t)
	ino := s46File(t, p, "mapped")
	p.mu.Lock()
	p.lin = lineage{gen: 7, base: 7, trusted: true}
	p.mu.Unlock()

	// The peer is away; the application stores into a shared mapping of
	// page 0: one KindMmap record (its later stores to the same dirty
	// page emit none until the page is written back).
	p.Record(&capture.Record{Kind: capture.KindMmap, Ino: ino, Pos: 0, Len: 4096}, time.Now())

	// The peer returns: a resync begins (fullSync's start).
	p.mu.Lock()
	mark := p.added
	dropped := p.dropForResync()
	if len(dropped) != 0 || p.j.Pending() != 1 {
		p.mu.Unlock()
		t.Fatalf("DropSettled dropped %d, kept %d: want the mapped file kept for a later pass", len(dropped), p.j.Pending())
	}
	p.out.resyncBegins()
	p.rs = ResyncStatus{Active: true, Mode: "bitmap"}
	// The resync reads page 0 from the page cache (version 1) and ships
	// it in batches 1..5; the file's changes are "all queued".
	p.out.next = 6
	p.marks.addFile(ino, mark, 5) // what ts.shipped -> fileShipped records
	p.mu.Unlock()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	bt := &batcher{p: p, ctx: ctx}
	b := newBuilder(p.root, p.Dev, nil, nil, bt, p.Log, nil)
	p.resyncQueued(b, bt, &treeSync{}, newTailFinder(dropped, p.Dev), resyncRun{start: time.Now(), mode: "bitmap", mark: mark, gen: 7}, 1, 0)

	// The application stores into page 0 again (version 2): no record.
	// The next pass takes the kept Writeback entry, writes the page back,
	// reads version 2 and ships it in batch 6.
	p.mu.Lock()
	files, passMark := p.takePass(time.Now())
	if len(files) != 1 || !files[0].Writeback {
		p.mu.Unlock()
		t.Fatalf("the pass took %+v, want the mapped file", files)
	}
	p.out.next = 7
	p.coverPass(passMark, files, nil, 0, 0, false, time.Now())

	// The peer makes the resync's batches (up to 5) durable, then its
	// host reboots before batch 6 is durable: the session is lost.
	p.out.acked, p.out.durable = 5, 5
	p.clearDirty(true)
	p.sessionLost()

	// What the next resync (bitmap mode: the lineage is trusted) has to
	// tell it that page 0 differs.
	spans, whole := p.dirty.spans(ino, 8192)
	inJournal := p.j.Pending() > 0
	l := wire.Entry{Path: "mapped", Ino: ino, Mode: 0o644, Size: 8192}
	pe := wire.Entry{Path: "mapped", Ino: ino, Mode: 0o644, Size: 8192}
	sendSpans, sendWhole := fileSpans(&l, &pe, &treeSync{dirty: p.dirty.clone()})
	trusted := p.lin.trusted
	p.mu.Unlock()
	if len(spans) == 0 && !whole && !inJournal {
		t.Fatalf("after the session was lost, page 0's change (shipped only in the lost batch 6) is in no bitmap mark "+
			"and no journal entry (bitmap trusted=%v); the next resync would send %v whole=%v for the file: "+
			"the peer keeps the bytes the first resync read", trusted, sendSpans, sendWhole)
	}
}

// TestPassMarkClearsPreopInProgress (review s46): a pass takes from the
// journal everything but the operations still in progress (Take keeps a
// preop until its KindAttr, or PreopTimeout). It records a pass mark
// covering every change counted up to its start (coverPass), the preop's
// record included, so once its batch is durable the bitmap forgets the
// preop's chunks, which no batch carried. When the operation completes,
// its KindAttr record marks only the metadata in the bitmap. If the peer
// leaves before the pass that ships the range is built, and the primary
// then stops cleanly, the saved bitmap says "metadata only" for the file:
// the next term's resync (bitmap mode) sends nothing for it (same size),
// and the peer keeps the old bytes of the range (an O_DIRECT write, a
// fallocate, a copy_file_range in flight during a pass).
func TestPassMarkClearsPreopInProgress(t *testing.T) {
	p := unconnectedPrimary(t)
	ino := s46File(t, p, "db")
	bitmap := s46Term(t, p)

	// An O_DIRECT write of page 0 begins: its preop record.
	p.Record(&capture.Record{Seq: 1, Kind: capture.KindPreop, Ino: ino, Pos: 0, Len: 4096}, time.Now())
	// A pass runs meanwhile: Take keeps the preop in the journal.
	p.mu.Lock()
	files, mark := p.takePass(time.Now())
	if p.j.Pending() != 1 {
		p.mu.Unlock()
		t.Fatalf("the pass took the preop in progress (journal holds %d)", p.j.Pending())
	}
	p.out.next = 2 // the pass's batch 1 (other files' changes)
	p.coverPass(mark, files, nil, 0, 0, false, time.Now())
	// The peer makes batch 1 durable.
	p.out.acked, p.out.durable = 1, 1
	p.clearDirty(true)
	p.mu.Unlock()
	// The write completes (page 0 now holds new bytes): its KindAttr.
	p.Record(&capture.Record{Seq: 2, Kind: capture.KindAttr, Ino: ino}, time.Now())
	// The peer goes away before the next pass is built; the primary stops
	// cleanly and saves its bitmap.
	if err := p.SaveDirty(); err != nil {
		t.Fatal(err)
	}
	d, _, err := loadDirty(bitmap)
	if err != nil {
		t.Fatal(err)
	}
	spans, whole := d.spans(ino, 8192)
	l := wire.Entry{Path: "db", Ino: ino, Mode: 0o644, Size: 8192}
	pe := l
	sendSpans, sendWhole := fileSpans(&l, &pe, &treeSync{dirty: d})
	if len(spans) == 0 && !whole {
		t.Fatalf("the saved bitmap marks nothing of page 0 (attr only %v); the O_DIRECT write's range was in the journal only "+
			"when the term stopped: the next bitmap resync sends %v whole=%v for the file", d.attrOnly(ino), sendSpans, sendWhole)
	}
}

// s46File writes an 8 KiB file name in p's directory and returns its inode.
func s46File(t *testing.T, p *Primary, name string) uint64 {
	t.Helper()
	path := filepath.Join(p.Dir.Path, name)
	if err := os.WriteFile(path, make([]byte, 8192), 0o644); err != nil {
		t.Fatal(err)
	}
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		t.Fatal(err)
	}
	return st.Ino
}

// s46Term begins p's term as the source whose replica of generation 5 was
// consistent (its bitmap trusted), and returns where the bitmap is saved.
func s46Term(t *testing.T, p *Primary) string {
	t.Helper()
	state := t.TempDir()
	ms, err := OpenMeta(state, "data")
	if err != nil {
		t.Fatal(err)
	}
	if err := ms.Update(func(m *Meta) { m.Gen, m.Consistent = 5, true }); err != nil {
		t.Fatal(err)
	}
	bitmap := filepath.Join(state, "bitmap-data")
	if err := p.BeginTerm(Term{Meta: ms, DirtyPath: bitmap}); err != nil {
		t.Fatal(err)
	}
	return bitmap
}
