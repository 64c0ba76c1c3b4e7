package replica

import (
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/duet-ha/duet/pkg/wire"
)

// recentPair is a tree src and its copy dst with the same mtimes, and a
// cutoff after both were made: what a resync finds after a clean stop.
func recentPair(t *testing.T, files ...string) (src, dst string, cutoff int64) {
	t.Helper()
	top := t.TempDir()
	src, dst = filepath.Join(top, "src"), filepath.Join(top, "dst")
	for _, f := range files {
		writeRandom(t, filepath.Join(src, f), 20000)
	}
	if err := os.CopyFS(dst, os.DirFS(src)); err != nil {
		t.Fatal(err)
	}
	for _, f := range files {
		st, err := os.Stat(filepath.Join(src, f))
		if err != nil {
			t.Fatal(err)
		}
		os.Chtimes(filepath.Join(dst, f), st.ModTime(), st.ModTime())
	}
	cutoff = time.Now().UnixNano()
	// Inode times come from the kernel's coarse clock, a tick behind.
	time.Sleep(50 * time.Millisecond)
	return src, dst, cutoff
}

// rewrite gives file p new bytes at the same size, its mtime set back.
func rewrite(t *testing.T, p string) {
	t.Helper()
	st, err := os.Stat(p)
	if err != nil {
		t.Fatal(err)
	}
	writeRandom(t, p, int(st.Size()))
	if err := os.Chtimes(p, st.ModTime(), st.ModTime()); err != nil {
		t.Fatal(err)
	}
}

// A file changed while nothing captured it (in the window) and moved
// after the resync's scan, before its checksums were read: the scan
// cannot tell whether it changed, and the rename the journal holds would
// move the peer's stale copy. It must be sent where it now is, not judged
// by its size or the bitmap (it was, once the comparison stopped opening
// unchanged files: "nothing sent, nothing requeued").
func TestResyncFileMovedBeforeItsSum(t *testing.T) {
	for _, bitmap := range []bool{false, true} {
		src, dst, cutoff := recentPair(t, "f")
		rewrite(t, filepath.Join(src, "f"))
		root, _ := scanSource(t, src)
		local, _, err := scanListing(root, false)
		if err != nil {
			t.Fatal(err)
		}
		want := markRecent(local, cutoff)
		os.Rename(filepath.Join(src, "f"), filepath.Join(src, "g"))
		_, pe := peerManifest(t, dst, wire.ManifestQuery{Want: want})
		peer := listingOf(pe)
		if _, err := sumCompared(root, local, peer); err != nil {
			t.Fatal(err)
		}
		ts := &treeSync{window: true}
		if bitmap {
			ts.dirty = newDirtySet()
		}
		b, sink := applyingBuilder(t, root, nil, dst)
		if err := b.fullSync(local, peer, ts); err != nil {
			t.Fatal(err)
		}
		if len(b.requeue) != 1 || !b.requeue[0].Rescan || sink.bytes != 0 {
			t.Fatalf("bitmap %v: f, changed here (wanted %v) and moved before its checksums were read: %d bytes sent, requeued %+v; want it requeued, to be sent whole where it is",
				bitmap, want, sink.bytes, b.requeue)
		}
	}
}

// A file rewritten at the same size with its mtime set back and renamed
// while nothing captured it: the comparison pairs it with the peer's
// file of the old name (same size and mtime), which has no checksums (the
// peer was asked for the new name). The bitmap knows nothing of it, and
// the peer kept the old bytes under the new name ("n: content differs at
// offset 0"): it must be sent whole.
func TestResyncRenamedAndRewrittenWhileStopped(t *testing.T) {
	src, dst, cutoff := recentPair(t, "o", "other")
	rewrite(t, filepath.Join(src, "o"))
	if err := os.Rename(filepath.Join(src, "o"), filepath.Join(src, "n")); err != nil {
		t.Fatal(err)
	}
	want, ops := windowResync(t, src, dst, cutoff)
	requireRenamed(t, ops, "o", "n", want)
	sameTrees(t, src, dst)
}

// windowResync runs the comparison of a resync that compares by checksums
// the files changed since cutoff (bitmap+recent, with an empty bitmap)
// from src into dst, applying what it sends, and returns the paths it
// wanted and the ops it sent.
func windowResync(t *testing.T, src, dst string, cutoff int64) (want []string, ops []wire.Op) {
	t.Helper()
	root, _ := scanSource(t, src)
	local, _, err := scanListing(root, false)
	if err != nil {
		t.Fatal(err)
	}
	want = markRecent(local, cutoff)
	_, pe := peerManifest(t, dst, wire.ManifestQuery{Want: want})
	peer := listingOf(pe)
	if _, err := sumCompared(root, local, peer); err != nil {
		t.Fatal(err)
	}
	b, sink := applyingBuilder(t, root, nil, dst)
	if err := b.fullSync(local, peer, &treeSync{window: true, dirty: newDirtySet()}); err != nil {
		t.Fatal(err)
	}
	return want, sink.ops
}

// requireRenamed fails the test unless ops rename from to to: the case
// the test sets up (a file paired with the peer's file of its old name).
func requireRenamed(t *testing.T, ops []wire.Op, from, to string, want []string) {
	t.Helper()
	for _, op := range ops {
		if op.Code == wire.OpRename && op.Path == from && op.Path2 == to {
			return
		}
	}
	t.Fatalf("%s was not paired with the peer's %s (wanted %v, ops %+v): the test no longer covers it", to, from, want, ops)
}
