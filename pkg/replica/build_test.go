package replica

import (
	"crypto/rand"
	"fmt"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/duet-ha/duet/pkg/capture"
	"github.com/duet-ha/duet/pkg/fstree"
	"github.com/duet-ha/duet/pkg/journal"
	"github.com/duet-ha/duet/pkg/wire"
	"golang.org/x/sys/unix"
)

// syncedPair makes src, a copy of it in dst, and a builder whose shadow
// is that common state, shipping into dst.
func syncedPair(t *testing.T, files ...string) (src, dst string, b *builder, sink *applySink) {
	t.Helper()
	top := t.TempDir()
	return syncedPairIn(t, top, top, files...)
}

// syncedPairIn is syncedPair with src in srcTop and dst in dstTop.
func syncedPairIn(t *testing.T, srcTop, dstTop string, files ...string) (src, dst string, b *builder, sink *applySink) {
	t.Helper()
	src, dst = filepath.Join(srcTop, "src"), filepath.Join(dstTop, "dst")
	os.Mkdir(src, 0o755)
	for _, f := range files {
		writeRandom(t, filepath.Join(src, f), 100)
	}
	if err := os.CopyFS(dst, os.DirFS(src)); err != nil {
		t.Fatal(err)
	}
	root, local := scanSource(t, src)
	b, sink = applyingBuilder(t, root, local, dst)
	return src, dst, b, sink
}

// changed is the journal entry of a directory whose entries changed.
func changed(t *testing.T, path string) journal.File {
	t.Helper()
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		t.Fatal(err)
	}
	return journal.File{Key: capture.InodeKey{Ino: st.Ino}, Attr: true}
}

// sameTrees fails t unless the trees at src and dst are the same (names,
// types, modes, owners, sizes, targets, contents).
func sameTrees(t *testing.T, src, dst string) {
	t.Helper()
	var ls [2][]wire.Entry
	for i, dir := range []string{src, dst} {
		r, err := fstree.OpenRoot(dir)
		if err != nil {
			t.Fatal(err)
		}
		ls[i], _, err = fstree.Scan(r, true)
		r.Close()
		if err != nil {
			t.Fatal(err)
		}
	}
	l, p := ls[0], ls[1]
	if diffs := fstree.Compare(l, p); len(diffs) != 0 {
		t.Fatalf("trees differ: %v", diffs)
	}
}

// A tree deleted and at once rebuilt at the same path: the peer's old
// directory must not survive under the new one (its entries that the new
// tree lacks were left on the peer: "only on peer" after a churn).
func TestBuildDirectoryReplacedAtSameName(t *testing.T) {
	src, dst, b, _ := syncedPair(t, "w/old1", "w/sub/old2", "w/keep")
	os.RemoveAll(filepath.Join(src, "w"))
	writeRandom(t, filepath.Join(src, "w/keep"), 50)
	writeRandom(t, filepath.Join(src, "w/new"), 70)
	// The new inodes may reuse the old ones' numbers: capture reports
	// each allocation, as it does in the daemon.
	files := []journal.File{changed(t, src)}
	for _, p := range []string{"w", "w/keep", "w/new"} {
		f := changed(t, filepath.Join(src, p))
		f.NewSeq = 1
		files = append(files, f)
	}
	if _, err := b.build(files); err != nil {
		t.Fatal(err)
	}
	// The old w, kept aside unless its number was taken again (then it
	// is retired), goes a pass later.
	if _, err := b.build(nil); err != nil {
		t.Fatal(err)
	}
	sameTrees(t, src, dst)
}

// `mv w w.old; mkdir w`: the peer renames its w away before it makes the
// new one, and does not ship w.old's content again.
func TestBuildRenameAwayThenRecreate(t *testing.T) {
	src, dst, b, sink := syncedPair(t, "w/a", "w/b")
	os.Rename(filepath.Join(src, "w"), filepath.Join(src, "w.old"))
	writeRandom(t, filepath.Join(src, "w/c"), 30)
	if _, err := b.build([]journal.File{changed(t, src)}); err != nil {
		t.Fatal(err)
	}
	sameTrees(t, src, dst)
	if sink.bytes != 30 {
		t.Fatalf("shipped %d bytes, want 30 (only w/c: w.old is a rename)", sink.bytes)
	}
	var renamed bool
	for _, op := range sink.ops {
		renamed = renamed || op.Code == wire.OpRename && op.Path == "w" && op.Path2 == "w.old"
	}
	if !renamed {
		t.Fatalf("w was not renamed to w.old on the peer: %+v", sink.ops)
	}
}

// `mv w archive/w.old; mkdir w`, w.old in a directory reconciled after w's:
// the peer's w is moved aside, not removed, and renamed into archive from
// there. At no op of the pass may the peer hold w/a's bytes nowhere (a
// takeover then would lose a file fsynced long before), and w/a is not
// shipped again.
func TestBuildMoveAwayDeeperThenRecreate(t *testing.T) {
	src, dst, b, sink := syncedPair(t, "w/a", "archive/keep")
	want, _ := os.ReadFile(filepath.Join(src, "w/a"))
	var nowhere []string
	b.out = sinkFunc(func(op *wire.Op) error {
		sink.add(op)
		found := false
		filepath.WalkDir(dst, func(p string, d os.DirEntry, err error) error {
			if err == nil && d.Type().IsRegular() {
				if got, _ := os.ReadFile(p); string(got) == string(want) {
					found = true
				}
			}
			return nil
		})
		if !found {
			nowhere = append(nowhere, op.Code.String()+" "+op.Path)
		}
		return nil
	})
	if err := os.Rename(filepath.Join(src, "w"), filepath.Join(src, "archive/w.old")); err != nil {
		t.Fatal(err)
	}
	writeRandom(t, filepath.Join(src, "w/c"), 30)
	if _, err := b.build([]journal.File{changed(t, src), changed(t, filepath.Join(src, "archive"))}); err != nil {
		t.Fatal(err)
	}
	sameTrees(t, src, dst)
	if len(nowhere) > 0 {
		t.Errorf("after %d ops (first: %s) the peer held w/a nowhere", len(nowhere), nowhere[0])
	}
	if sink.bytes != 30 {
		t.Errorf("shipped %d bytes, want 30 (w/c only: w.old is a rename)", sink.bytes)
	}
}

type sinkFunc func(op *wire.Op) error

func (f sinkFunc) add(op *wire.Op) error { return f(op) }

// inoOf is the inode number of path.
func inoOf(t *testing.T, path string) uint64 {
	t.Helper()
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		t.Fatal(err)
	}
	return st.Ino
}

// span is a journal entry for bytes [off, end) of path.
func span(t *testing.T, path string, off, end uint64) journal.File {
	f := journal.File{Key: capture.InodeKey{Ino: inoOf(t, path)}, MaxSeq: 1}
	f.Data.Add(off, end-off)
	return f
}

// A new file's write is reported (write_end) before it moves the size: the
// pass that finds the file in its directory sends it whole as it is then,
// and the reported bytes beyond that size must stay queued. They were
// taken as sent with the file: the peer kept an empty file where the
// writer's bytes were ("content differs at offset 0",
// TestReplicationWorkload/seed3).
func TestBuildNewFileWriteBeforeSizeMoved(t *testing.T) {
	src, dst, b, _ := syncedPair(t, "a")
	n := filepath.Join(src, "n")
	if err := os.WriteFile(n, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	requeue, err := b.build([]journal.File{changed(t, src), span(t, n, 0, 4096)})
	if err != nil {
		t.Fatal(err)
	}
	if len(requeue) != 1 || requeue[0].Key.Ino != inoOf(t, n) || requeue[0].Data.Empty() {
		t.Fatalf("requeued %+v, want n's bytes [0,4096)", requeue)
	}
	if b.blocked != 0 {
		t.Errorf("bytes beyond EOF block barriers (%d)", b.blocked)
	}
	// The write moves the size; the next pass ships the bytes.
	writeRandom(t, n, 4096)
	if _, err := b.build(requeue); err != nil {
		t.Fatal(err)
	}
	sameTrees(t, src, dst)
}

// The same for a file compared whole because a record about it was lost.
func TestBuildRescanWriteBeforeSizeMoved(t *testing.T) {
	src, dst, b, _ := syncedPair(t, "a")
	a := filepath.Join(src, "a")
	f := span(t, a, 100, 4096)
	f.Rescan, f.Attr = true, true
	requeue, err := b.build([]journal.File{f})
	if err != nil {
		t.Fatal(err)
	}
	if len(requeue) != 1 || requeue[0].Data.Spans()[0] != (journal.Span{Off: 100, End: 4096}) {
		t.Fatalf("requeued %+v, want a's bytes [100,4096)", requeue)
	}
	old, _ := os.ReadFile(a)
	more := make([]byte, 4096-100)
	rand.Read(more)
	if err := os.WriteFile(a, append(old, more...), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := b.build(requeue); err != nil {
		t.Fatal(err)
	}
	sameTrees(t, src, dst)
}

// A change that cannot be shipped is retried until it has been tried
// maxRetries times over minRetryAge, however quickly passes come; then it
// is handed to a resync (gaveUp), not dropped. Bytes that stay beyond the
// end of the file are given up quietly: a truncate removed them.
func TestBuildGivesUpOnlyAfterTriesAndTime(t *testing.T) {
	src, _, b, _ := syncedPair(t, "a", "d/b")
	bpath := filepath.Join(src, "d/b")
	ino := inoOf(t, bpath)
	// d/b renamed with no record about d yet: its shadow path names
	// nothing.
	if err := os.Rename(bpath, filepath.Join(src, "d/c")); err != nil {
		t.Fatal(err)
	}
	moved := journal.File{Key: capture.InodeKey{Ino: ino}, Attr: true, MaxSeq: 1}
	a := filepath.Join(src, "a")
	beyond := span(t, a, 100, 200)
	for _, tc := range []struct {
		name        string
		retries     int
		age         time.Duration
		gaveUp      bool
		requeuedLen int
	}{
		{"first try", 0, 0, false, 2},
		{"many tries, little time", maxRetries + 10, minRetryAge / 4, false, 2},
		{"long, few tries", 3, 10 * minRetryAge, false, 2},
		{"many tries, long", maxRetries, minRetryAge + time.Second, true, 0},
	} {
		m, e := moved, beyond
		m.Retries, e.Retries = tc.retries, tc.retries
		if tc.age > 0 {
			m.RetryFrom, e.RetryFrom = time.Now().Add(-tc.age), time.Now().Add(-tc.age)
		}
		requeue, err := b.build([]journal.File{m, e})
		if err != nil {
			t.Fatal(err)
		}
		if len(requeue) != tc.requeuedLen {
			t.Errorf("%s: requeued %d, want %d", tc.name, len(requeue), tc.requeuedLen)
		}
		for _, r := range requeue {
			if r.RetryFrom.IsZero() {
				t.Errorf("%s: requeued without the time of its first try", tc.name)
			}
		}
		if got := len(b.gaveUp) > 0; got != tc.gaveUp {
			t.Errorf("%s: gave up %v, want %v", tc.name, got, tc.gaveUp)
		}
		if tc.gaveUp && (len(b.gaveUp) != 1 || b.gaveUp[0].key.Ino != ino) {
			t.Errorf("%s: gave up %+v, want d/b for a resync (a's bytes beyond EOF given up quietly)", tc.name, b.gaveUp)
		}
	}
}

// A change handed to a resync keeps the peer out of "in sync" until the
// resync has compared its file: the bitmap marks it whole, and a resync
// is asked for.
func TestGivenUpChangeAsksForResync(t *testing.T) {
	p := unconnectedPrimary(t)
	p.mu.Lock()
	p.needFull, p.connected, p.lin.trusted = false, true, true
	p.resyncGivenUp([]gaveUp{{key: capture.InodeKey{Ino: 42}, why: "test"}})
	full, all, marked := p.needFull, p.forceAll, p.dirty.has(42)
	p.dirty.clear(p.added - 1) // a pass taken before it was given up
	kept := p.dirty.has(42)
	p.mu.Unlock()
	if !full || all || !marked || !kept {
		t.Fatalf("resync asked %v (every file %v), file marked %v, kept by an earlier pass's durability %v: want a bitmap resync of it", full, all, marked, kept)
	}
	if st := p.Status(); st.InSync || st.DroppedChanges != 1 {
		t.Fatalf("status in sync %v, dropped %d: want out of sync, 1", st.InSync, st.DroppedChanges)
	}
}

// A resync takes over the journal's pending changes and reads each file
// at the size its scan saw: a write reported before it moved the size was
// not read whole, and what lay beyond must stay queued.
func TestResyncKeepsWriteBeyondScannedSize(t *testing.T) {
	src, _, b, _ := syncedPair(t, "a", "b")
	a, bb := filepath.Join(src, "a"), filepath.Join(src, "b")
	local := []wire.Entry{
		{Path: "a", Ino: inoOf(t, a), Mode: 0o644, Size: 100},
		{Path: "b", Ino: inoOf(t, bb), Mode: 0o644, Size: 100},
	}
	dropped := []journal.File{span(t, a, 50, 4096), span(t, bb, 0, 100)}
	tails := newTailFinder(dropped, b.dev)
	for _, e := range local {
		tails.see(e.Ino, e.Mode, e.Size)
	}
	b.beyondScan(tails.tails)
	if len(b.requeue) != 1 || b.requeue[0].Key.Ino != local[0].Ino ||
		b.requeue[0].Data.Spans()[0] != (journal.Span{Off: 100, End: 4096}) {
		t.Fatalf("requeued %+v, want a's [100,4096) only", b.requeue)
	}
}

// A long write (throttled by dirty-page writeback for seconds) keeps bytes
// announced ahead of its pages beyond EOF for longer than minRetryAge, and
// its new records come between passes, into the entry requeued for it.
// Such a record is a change never tried: the page it reports, read by a
// pass just before the write moved the size over it, must not be given
// up with the entry's older bytes.
func TestBuildNewRecordAfterRequeueRestartsTries(t *testing.T) {
	src, dst, b, _ := syncedPair(t, "a")
	a := filepath.Join(src, "a")
	j := journal.New()
	ahead := span(t, a, 4196, 8292) // announced, not copied yet
	ahead.Retries, ahead.RetryFrom = maxRetries, time.Now().Add(-3*minRetryAge)
	j.Requeue(ahead)
	// write_end of the page [100,4196): the size has not moved yet.
	j.Add(&capture.Record{Seq: 2, Ino: inoOf(t, a), Pos: 100, Len: 4096, Kind: capture.KindData}, time.Now())
	requeue, err := b.build(j.Take(time.Now()))
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range requeue {
		j.Requeue(f)
	}
	// The size moves over the page; no record follows.
	old, _ := os.ReadFile(a)
	page := make([]byte, 4096)
	rand.Read(page)
	if err := os.WriteFile(a, append(old, page...), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := b.build(j.Take(time.Now())); err != nil {
		t.Fatal(err)
	}
	sameTrees(t, src, dst)
}

// A change handed to a resync is on neither the peer nor in the journal
// until that resync ships its file. Meanwhile the copy's sync point must
// not move past it (after a crash, only files changed since the sync
// point are compared: the change would never reach the peer), and a
// handover must not record this copy as a replica holding nothing of
// its own.
func TestGivenUpChangeHoldsSyncPointAndHandover(t *testing.T) {
	p := unconnectedPrimary(t)
	ms, err := OpenMeta(t.TempDir(), "data")
	if err != nil {
		t.Fatal(err)
	}
	if err := ms.Update(func(m *Meta) { m.Gen, m.Source, m.Consistent, m.SyncTime = 7, true, true, 1 }); err != nil {
		t.Fatal(err)
	}
	p.mu.Lock()
	p.needFull, p.connected, p.lin.trusted = false, true, true
	p.lin.gen, p.lin.base, p.meta = 7, 7, ms
	p.resyncGivenUp([]gaveUp{{key: capture.InodeKey{Ino: 42}, why: "test"}})
	p.mu.Unlock()
	p.moveSyncPoint(nil)
	if m := ms.Get(); m.SyncTime != 1 {
		t.Errorf("sync point moved to %v with a given-up change not on the peer", time.Unix(0, m.SyncTime))
	}
	if err := p.HandedOver(); err != nil {
		t.Fatal(err)
	}
	if m := ms.Get(); !m.Source {
		t.Error("a handover with a given-up change not on the peer recorded this copy as holding nothing of its own")
	}
}

// Two files new in a directory that is renamed while the pass ships the
// first: the second must still be sent whole. It was opened by the
// directory's path of the pass's start, which no longer led to it: the
// create was shipped, the content never (the peer kept an empty file,
// "content differs at offset 0", TestChurnDeleteRecreate seed 2).
func TestBuildNewFilesInDirectoryRenamedDuringPass(t *testing.T) {
	src, dst, b, _ := syncedPair(t, "d/keep", "other/keep")
	writeRandom(t, filepath.Join(src, "d/a"), 100)
	writeRandom(t, filepath.Join(src, "d/b"), 200)
	moved := false
	b.onRead = func(int) {
		if !moved {
			moved = true
			if err := os.Rename(filepath.Join(src, "d"), filepath.Join(src, "other/d2")); err != nil {
				t.Fatal(err)
			}
		}
	}
	if _, err := b.build([]journal.File{changed(t, filepath.Join(src, "d"))}); err != nil {
		t.Fatal(err)
	}
	if !moved {
		t.Fatal("nothing was read for shipping: the rename never ran")
	}
	// The rename's records: both parents changed.
	b.onRead = nil
	if _, err := b.build([]journal.File{changed(t, src), changed(t, filepath.Join(src, "other"))}); err != nil {
		t.Fatal(err)
	}
	sameTrees(t, src, dst)
}

// The same for a new directory: its entries are shipped by reconciling it
// by its path, which the rename made stale. It must be compared again in
// a later pass; it was left empty on the peer.
func TestBuildNewDirectoryInDirectoryRenamedDuringPass(t *testing.T) {
	src, dst, b, _ := syncedPair(t, "d/keep", "other/keep")
	writeRandom(t, filepath.Join(src, "d/a"), 100)
	writeRandom(t, filepath.Join(src, "d/sub/x"), 300)
	moved := false
	b.onRead = func(int) {
		if !moved {
			moved = true
			if err := os.Rename(filepath.Join(src, "d"), filepath.Join(src, "other/d2")); err != nil {
				t.Fatal(err)
			}
		}
	}
	requeue, err := b.build([]journal.File{changed(t, filepath.Join(src, "d"))})
	if err != nil {
		t.Fatal(err)
	}
	if !moved {
		t.Fatal("nothing was read for shipping: the rename never ran")
	}
	b.onRead = nil
	if _, err := b.build(append(requeue, changed(t, src), changed(t, filepath.Join(src, "other")))); err != nil {
		t.Fatal(err)
	}
	sameTrees(t, src, dst)
}

// A new file that cannot be opened for a reason other than being gone
// (here another process's write lease: the open is non-blocking) is still
// here and nothing else will report it: the pass must compare its
// directory again, not drop the file (the peer never got it).
func TestBuildNewFileNotOpenedIsRetried(t *testing.T) {
	src, dst, b, _ := syncedPair(t, "d/keep")
	p := filepath.Join(src, "d/new")
	writeRandom(t, p, 300)
	f, err := os.OpenFile(p, os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := unix.FcntlInt(f.Fd(), unix.F_SETLEASE, unix.F_WRLCK); err != nil {
		t.Skipf("no write lease here: %v", err)
	}
	requeue, err := b.build([]journal.File{changed(t, filepath.Join(src, "d"))})
	if err != nil {
		t.Fatal(err)
	}
	unix.FcntlInt(f.Fd(), unix.F_SETLEASE, unix.F_UNLCK)
	f.Close()
	if _, err := os.Stat(filepath.Join(dst, "d/new")); err != nil && len(requeue) == 0 {
		t.Fatalf("d/new is not on the peer (%v) and nothing is retried: no later record ships it", err)
	}
	if _, err := b.build(requeue); err != nil {
		t.Fatal(err)
	}
	sameTrees(t, src, dst)
}

// Reading a file or a directory to ship it leaves its access time alone:
// under relatime a read moved it (the access time was older than the
// modification), which dirtied the inode, which the capture reported as a
// change of its own: every synchronous write was shipped twice, a second
// batch with the size and times for another apply and flush on the peer
// (seen with the ext4_mark_inode_dirty tracepoint: touch_atime from the
// builder's pread). The test needs a filesystem mounted relatime or
// strictatime, as /tmp is here.
func TestBuildLeavesAccessTimes(t *testing.T) {
	src, _, b, _ := syncedPair(t, "f", "d/g")
	old := time.Date(2020, 1, 2, 3, 4, 5, 0, time.UTC)
	now := time.Now()
	for _, p := range []string{"f", "d"} {
		if err := os.Chtimes(filepath.Join(src, p), old, now); err != nil {
			t.Fatal(err)
		}
	}
	// The same reads without O_NOATIME move the access time here, or
	// the filesystem keeps none and the test proves nothing.
	probe := filepath.Join(t.TempDir(), "probe")
	os.WriteFile(probe, []byte("x"), 0o644)
	os.Chtimes(probe, old, now)
	os.ReadFile(probe)
	if atime(t, probe).Equal(old) {
		t.Skip("this filesystem does not move access times on reads (noatime): nothing to check")
	}
	files := []journal.File{span(t, filepath.Join(src, "f"), 0, 100), changed(t, filepath.Join(src, "d"))}
	rescan := changed(t, filepath.Join(src, "f"))
	rescan.Rescan = true
	for _, pass := range [][]journal.File{files, {rescan}} {
		if _, err := b.build(pass); err != nil {
			t.Fatal(err)
		}
		for _, p := range []string{"f", "d"} {
			if got := atime(t, filepath.Join(src, p)); !got.Equal(old) {
				t.Fatalf("%s: shipping it moved its access time from %v to %v", p, old, got)
			}
		}
	}
}

func atime(t *testing.T, path string) time.Time {
	t.Helper()
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		t.Fatal(err)
	}
	return time.Unix(st.Atim.Unix())
}

// A change of a file's inode that leaves everything the peer keeps of it
// as last shipped (its size, mode, owner and times) ships nothing: XFS
// logs an append's on-disk size when the data is written, which the
// capture reports like any change of the inode, and each synchronous
// append went to the peer twice (TestSyncWriteShippedOnce on XFS: 1.71
// batches a write). A real change ships, and so does an attribute-only
// change after the cache was cleared (a full sync).
func TestBuildUnchangedAttributesShipNothing(t *testing.T) {
	src, dst, b, sink := syncedPair(t, "f")
	b.shipped = attrCache{}
	f := filepath.Join(src, "f")
	pass := func(files ...journal.File) int {
		t.Helper()
		before := len(sink.ops)
		if _, err := b.build(files); err != nil {
			t.Fatal(err)
		}
		return len(sink.ops) - before
	}
	attr := changed(t, f)
	if n := pass(attr); n == 0 {
		t.Fatal("the first attribute change shipped nothing")
	}
	if n := pass(attr); n != 0 {
		t.Fatalf("an inode change that changed nothing the peer keeps shipped %d ops: %v", n, sink.ops[len(sink.ops)-n:])
	}
	os.Chmod(f, 0o600)
	if n := pass(attr); n == 0 {
		t.Fatal("a chmod shipped nothing")
	}
	// Bytes without the inode's change: the peer's write moves its
	// copy's mtime, so the times go with them
	// (TestDivergenceDataOnlyPassLeavesPeerMtime); but no size went, so
	// the next attribute record ships again
	// (TestDataOnlyPassDoesNotCacheUnshippedSize).
	before := len(sink.ops)
	if n := pass(span(t, f, 0, 10)); n == 0 {
		t.Fatal("a write shipped nothing")
	}
	if last := sink.ops[len(sink.ops)-1]; len(sink.ops) == before || last.Code != wire.OpSetattr {
		t.Fatalf("a write's bytes went without the times: %v", sink.ops[before:])
	}
	if n := pass(attr); n == 0 {
		t.Fatal("an attribute record after bytes shipped without the size was taken as on the peer")
	}
	clear(b.shipped)
	if n := pass(attr); n == 0 {
		t.Fatal("an emptied cache skipped a change")
	}
	sameTrees(t, src, dst)
	var a, c unix.Stat_t
	unix.Stat(f, &a)
	unix.Stat(filepath.Join(dst, "f"), &c)
	if a.Mtim != c.Mtim || a.Mode != c.Mode {
		t.Fatalf("peer's f: mtime %v mode %o, want %v %o", c.Mtim, c.Mode, a.Mtim, a.Mode)
	}
}

// A record of an inode's allocation read after a pass had found a newer
// inode with that number in its directory (the number freed and taken
// again in between: the lab's TestRingOverflowRescan, where the pass
// that read the directory had taken its records before the daemon was
// stopped, and the old allocation's record came with the ring's backlog).
// Retiring the shadow's node removed the live file's names from the peer,
// and nothing shipped them again: "missing on peer" after the copies were
// in sync.
func TestBuildStaleNewRecordKeepsLiveInode(t *testing.T) {
	src, dst, b, sink := syncedPair(t, "a")
	writeRandom(t, filepath.Join(src, "new"), 40)
	if err := os.Link(filepath.Join(src, "new"), filepath.Join(src, "h-new")); err != nil {
		t.Fatal(err)
	}
	if _, err := b.build([]journal.File{changed(t, src)}); err != nil {
		t.Fatal(err)
	}
	sameTrees(t, src, dst)
	ino := inoOf(t, filepath.Join(src, "new"))
	n, ok := b.sh.node(ino)
	if !ok || !n.genKnown {
		t.Skipf("the shadow knows no generation for the new file (node %v, known %v): the filesystem of %s has no file handles", ok, n.genKnown, src)
	}
	// The earlier allocation of the number: another generation.
	stale := journal.File{Key: capture.InodeKey{Ino: ino}, NewSeq: 5, NewGen: n.gen ^ 1, Gen: n.gen ^ 1, HasGen: true, MaxSeq: 5}
	sink.ops = nil
	if _, err := b.build([]journal.File{stale}); err != nil {
		t.Fatal(err)
	}
	for _, op := range sink.ops {
		if op.Code == wire.OpRemove {
			t.Errorf("the pass removed %q from the peer for a record of an earlier allocation of its inode number", op.Path)
		}
	}
	sameTrees(t, src, dst)
	// A record of a later allocation still retires the node: the file at
	// the shadow's names is another inode now.
	os.Remove(filepath.Join(src, "new"))
	os.Remove(filepath.Join(src, "h-new"))
	writeRandom(t, filepath.Join(src, "new"), 20)
	nino := inoOf(t, filepath.Join(src, "new"))
	f := changed(t, src)
	later := journal.File{Key: capture.InodeKey{Ino: nino}, NewSeq: 6, NewGen: n.gen ^ 2, Gen: n.gen ^ 2, HasGen: true, MaxSeq: 6}
	if _, err := b.build([]journal.File{f, later}); err != nil {
		t.Fatal(err)
	}
	// The retired node, kept aside, goes a pass later.
	if _, err := b.build(nil); err != nil {
		t.Fatal(err)
	}
	sameTrees(t, src, dst)
}

// The same late record when the shadow knows no generation for the node
// (a file found by a scan, or moved by a rename): the earlier pass read
// the directory after the number was freed and taken again, and took the
// new file for the old one renamed. The record of the new allocation,
// taken next, retires the node, whose names go from the peer: the new
// file must then be found again in its directory in the same pass (no
// later record of the directory need come). From a review: "b0: missing
// on peer" on the old code.
func TestBuildRetiredNodeFoundAgainInItsDirectory(t *testing.T) {
	src, dst, b, _ := syncedPair(t, "a", "keep")
	scannedWithoutGens(b.sh)
	ino := inoOf(t, filepath.Join(src, "a"))
	if n, ok := b.sh.node(ino); !ok || n.genKnown {
		t.Fatalf("the scanned file's node: found %v, generation known %v; want found, not known", ok, n.genKnown)
	}
	gen, ok := passAfterReuse(t, src, b, ino)
	f := journal.File{Key: capture.InodeKey{Ino: ino}, NewSeq: 5, NewGen: gen, Gen: gen, HasGen: ok, MaxSeq: 5, Attr: true}
	f.Data.Add(0, 70)
	if _, err := b.build([]journal.File{f}); err != nil {
		t.Fatal(err)
	}
	sameTrees(t, src, dst)
}

// A file found by a scan (the shadow knows no generation for it), then a
// record of an allocation of its number: of the file itself (created while
// the scan ran), or of an earlier one (freed before the scan). The node
// was retired: its name went from the peer, and the file came back only
// when its directory was read again in the same pass, perhaps in a later
// batch; a primary lost between the two left the peer without a file
// whose writes it had acknowledged. The file is now sent whole where it
// is: the pass removes and creates nothing.
func TestBuildScannedFileKeptForARecordOfItsNumber(t *testing.T) {
	for _, c := range []struct {
		name string
		gen  func(uint32) uint32
	}{{"its own allocation", func(g uint32) uint32 { return g }}, {"an earlier allocation", func(g uint32) uint32 { return g ^ 1 }}} {
		t.Run(c.name, func(t *testing.T) {
			src, dst, b, sink := syncedPair(t, "a", "keep")
			scannedWithoutGens(b.sh)
			if err := os.Link(filepath.Join(src, "a"), filepath.Join(src, "h-a")); err != nil {
				t.Fatal(err)
			}
			if _, err := b.build([]journal.File{changed(t, src)}); err != nil {
				t.Fatal(err)
			}
			ino := inoOf(t, filepath.Join(src, "a"))
			if n, ok := b.sh.node(ino); !ok || n.genKnown {
				t.Fatalf("the scanned file's node: found %v, generation known %v; want found, not known", ok, n.genKnown)
			}
			gen := nameGen(t, src, "a")
			sink.ops = nil
			f := journal.File{Key: capture.InodeKey{Ino: ino}, NewSeq: 5, NewGen: c.gen(gen), Gen: c.gen(gen), HasGen: true, MaxSeq: 5}
			if _, err := b.build([]journal.File{f}); err != nil {
				t.Fatal(err)
			}
			for _, op := range sink.ops {
				if op.Code == wire.OpRemove || op.Code == wire.OpCreate || op.Code == wire.OpRename {
					t.Errorf("the pass sent %v %q: the live file was taken off the peer before it came back", op.Code, op.Path)
				}
			}
			sameTrees(t, src, dst)
			if n, _ := b.sh.node(ino); !n.genKnown || n.gen != gen {
				t.Errorf("the shadow's node: generation %d (known %v), want %d", n.gen, n.genKnown, gen)
			}
		})
	}
}

// The node kept for a record of its number must still end as the file
// that lives at its name when that is another inode: a scanned file
// removed, its number taken by a new file under the same name. A pass of
// the directory sees the same name and number and ships nothing; the new
// file's record names only the bytes it wrote, and the rest of the new
// file (a hole here, of the old file's size) must replace the old bytes
// the peer still has: the file is sent whole. Without that, "a: content
// differs at offset 0" (from a review). With the generations the scan
// reads, the directory's pass tells the new file from the old itself: the
// old goes aside, removed a pass later.
func TestBuildScannedNodeReplacedUnderItsName(t *testing.T) {
	for _, gens := range []bool{false, true} {
		t.Run(fmt.Sprintf("generations known %v", gens), func(t *testing.T) { scannedNodeReplacedUnderItsName(t, gens) })
	}
}

func scannedNodeReplacedUnderItsName(t *testing.T, gens bool) {
	src, dst, b, _ := syncedPair(t, "a", "keep")
	if !gens {
		scannedWithoutGens(b.sh)
	}
	ino := inoOf(t, filepath.Join(src, "a"))
	dirRec := changed(t, src)
	os.Remove(filepath.Join(src, "a"))
	reused := ""
	for i := 0; i < 50 && reused == ""; i++ {
		p := filepath.Join(src, fmt.Sprintf("b%d", i))
		writeRandom(t, p, 10)
		if err := os.Truncate(p, 100); err != nil {
			t.Fatal(err)
		}
		if inoOf(t, p) == ino {
			reused = p
		} else {
			os.Remove(p)
		}
	}
	if reused == "" {
		t.Skipf("the filesystem of %s gave none of 50 new files the number of the removed one", src)
	}
	if err := os.Rename(reused, filepath.Join(src, "a")); err != nil {
		t.Fatal(err)
	}
	if _, err := b.build([]journal.File{dirRec}); err != nil {
		t.Fatal(err)
	}
	gen := nameGen(t, src, "a")
	f := journal.File{Key: capture.InodeKey{Ino: ino}, NewSeq: 5, NewGen: gen, Gen: gen, HasGen: true, MaxSeq: 5, Attr: true}
	f.Data.Add(0, 10)
	if _, err := b.build([]journal.File{f}); err != nil {
		t.Fatal(err)
	}
	if gens {
		if _, err := b.build(nil); err != nil {
			t.Fatal(err)
		}
	}
	sameTrees(t, src, dst)
}

// scannedWithoutGens leaves the shadow's nodes as a scan that read no
// generations did: the builder's path for the nodes whose generation it
// does not know.
func scannedWithoutGens(s *shadow) {
	for i := range s.recs {
		s.recs[i].set(recGenKnown, false)
	}
}

// TestBuildRetiredNodeFoundAgainInItsDirectory in a big directory that
// has a record of its own in the pass, with a record of an earlier
// allocation (its handle finds nothing, so no name is looked up for it):
// the directory's record (not read whole, only the names the pass's
// inodes were found under) was kept over the one the retire added, and
// the live file went from the peer. From a review.
func TestBuildRetiredNodeFoundAgainInBigDirectory(t *testing.T) {
	src, dst, b, _ := syncedPair(t, "a", "keep")
	for i := 0; i < bigDirEntries; i++ {
		if err := os.WriteFile(filepath.Join(src, fmt.Sprintf("e%04d", i)), nil, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := b.build([]journal.File{changed(t, src)}); err != nil {
		t.Fatal(err)
	}
	if root := inoOf(t, src); !b.sh.big[root] {
		t.Fatalf("%d entries: the directory is not big", bigDirEntries+2)
	}
	ino := inoOf(t, filepath.Join(src, "a"))
	gen, ok := passAfterReuse(t, src, b, ino)
	if !ok {
		t.Skipf("no generation from the file handles of %s", src)
	}
	// The record of an earlier allocation (the number taken twice since
	// the scan): looked up by its handle, it is not found.
	f := journal.File{Key: capture.InodeKey{Ino: ino}, NewSeq: 5, NewGen: gen ^ 1, Gen: gen ^ 1, HasGen: true, MaxSeq: 5, Attr: true}
	if _, err := b.build([]journal.File{changed(t, src), f}); err != nil {
		t.Fatal(err)
	}
	// The retired node, kept aside, goes a pass later.
	if _, err := b.build(nil); err != nil {
		t.Fatal(err)
	}
	sameTrees(t, src, dst)
}

// nameGen is the generation of dir/name's inode, from its file handle; the
// test is skipped on a filesystem whose handles give none.
func nameGen(t *testing.T, dir, name string) uint32 {
	t.Helper()
	d, err := os.Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	_, gen, ok := fstree.Generation(int(d.Fd()), name)
	if !ok {
		t.Skipf("no generation from the file handles of %s", dir)
	}
	return gen
}

// passAfterReuse removes src/a (inode ino), makes new files until one
// takes its number, then runs a pass with the directory's record taken
// before (it finds the new file where a was, and ships it as a renamed a).
// It returns the new file's generation, as a record of its allocation
// carries it.
func passAfterReuse(t *testing.T, src string, b *builder, ino uint64) (uint32, bool) {
	t.Helper()
	dirRec := changed(t, src) // the earlier pass's record, taken before
	os.Remove(filepath.Join(src, "a"))
	reused := ""
	for i := 0; i < 50 && reused == ""; i++ {
		p := filepath.Join(src, fmt.Sprintf("b%d", i))
		writeRandom(t, p, 70)
		if inoOf(t, p) == ino {
			reused = p
		}
	}
	if reused == "" {
		t.Skipf("the filesystem of %s gave none of 50 new files the number of the removed one", src)
	}
	if _, err := b.build([]journal.File{dirRec}); err != nil {
		t.Fatal(err)
	}
	d, err := os.Open(src)
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	_, gen, ok := fstree.Generation(int(d.Fd()), filepath.Base(reused))
	return gen, ok
}
