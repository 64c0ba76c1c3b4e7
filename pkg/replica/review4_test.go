package replica

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/duet-ha/duet/pkg/capture"
	"github.com/duet-ha/duet/pkg/wire"
	"golang.org/x/sys/unix"
)

// attrMarks is a bitmap holding a metadata mark (ext4_mark_inode_dirty)
// for each of paths, as capture reports a rename, a link count change, a
// chmod or a read's atime update.
func attrMarks(t *testing.T, paths ...string) *dirtySet {
	t.Helper()
	d := newDirtySet()
	for _, p := range paths {
		var st unix.Stat_t
		if err := unix.Stat(p, &st); err != nil {
			t.Fatal(err)
		}
		d.record(&capture.Record{Kind: capture.KindAttr, Ino: st.Ino}, 1)
	}
	return d
}

// bitmapResync runs a bitmap resync from src into dst with bitmap d, as
// Primary.fullSync does (the files markBitmapCompared flags compared by
// checksums), applying what it sends.
func bitmapResync(t *testing.T, src, dst string, d *dirtySet) (*applySink, *treeSync) {
	t.Helper()
	return bitmapResyncShadow(t, src, dst, d, nil)
}

// bitmapResyncShadow is bitmapResync by a primary that still holds sh, the
// shadow of the peer's last session (nil: a primary started since).
func bitmapResyncShadow(t *testing.T, src, dst string, d *dirtySet, sh *shadow) (*applySink, *treeSync) {
	t.Helper()
	root, _ := scanSource(t, src)
	local, _, err := scanListing(root, false)
	if err != nil {
		t.Fatal(err)
	}
	want, _ := markBitmapCompared(local, d, sh)
	_, pe := peerManifest(t, dst, wire.ManifestQuery{Want: want})
	peer := listingOf(pe)
	if _, err := sumCompared(root, local, peer); err != nil {
		t.Fatal(err)
	}
	b, sink := applyingBuilder(t, root, nil, dst)
	ts := &treeSync{dirty: d, window: true}
	if err := b.fullSync(local, peer, ts); err != nil {
		t.Fatal(err)
	}
	return sink, ts
}

// TestResyncBitmapRenameOverSameMtime is TestResyncBitmapRenameOver with
// the two files' mtimes equal (written within one tick of the coarse
// clock, or copied with their times: cp -p, tar, rsync -t): the moved
// inode has only metadata marks and the mtime the peer's file has, so it
// is trusted to the bitmap and the peer keeps the replaced file's bytes
// under the name (at another size, gets only the size).
func TestResyncBitmapRenameOverSameMtime(t *testing.T) {
	for _, size := range []int{5000, 7000} {
		t.Run(map[int]string{5000: "samesize", 7000: "othersize"}[size], func(t *testing.T) {
			top := t.TempDir()
			src, dst := filepath.Join(top, "src"), filepath.Join(top, "dst")
			writeRandom(t, filepath.Join(src, "log.1"), size)
			writeRandom(t, filepath.Join(src, "log.2"), 5000)
			if err := os.CopyFS(dst, os.DirFS(src)); err != nil {
				t.Fatal(err)
			}
			same := time.Now().Add(-time.Hour)
			for _, d := range []string{src, dst} {
				for _, p := range []string{"log.1", "log.2"} {
					os.Chtimes(filepath.Join(d, p), same, same)
				}
			}
			// The peer is away; duet runs and captures the rename.
			if err := os.Rename(filepath.Join(src, "log.1"), filepath.Join(src, "log.2")); err != nil {
				t.Fatal(err)
			}
			bitmapResync(t, src, dst, attrMarks(t, src, filepath.Join(src, "log.2")))
			sameTrees(t, src, dst)
		})
	}
}

// TestResyncBitmapAttrOnlyNotWhole: a file whose data the peer has
// durably but whose mtime there is the peer's own (a batch that carried
// its last bytes without a setattr: the mtime a write leaves on the
// replica is that host's, applier.go), and whose bitmap entry holds a
// metadata mark only (a read's atime update, writeback's block
// allocation, a btrfs write's attr record at syscall exit, still
// unacknowledged when the peer went away). Nothing of its data changed:
// a bitmap resync must not send it whole (a database file of many GiB).
func TestResyncBitmapAttrOnlyNotWhole(t *testing.T) {
	top := t.TempDir()
	src, dst := filepath.Join(top, "src"), filepath.Join(top, "dst")
	writeRandom(t, filepath.Join(src, "db"), 1<<20)
	if err := os.CopyFS(dst, os.DirFS(src)); err != nil {
		t.Fatal(err)
	}
	st, err := os.Stat(filepath.Join(src, "db"))
	if err != nil {
		t.Fatal(err)
	}
	peerTime := st.ModTime().Add(3 * time.Millisecond) // when the peer applied the last write
	os.Chtimes(filepath.Join(dst, "db"), peerTime, peerTime)
	sink, _ := bitmapResync(t, src, dst, attrMarks(t, filepath.Join(src, "db")))
	sameTrees(t, src, dst)
	if sink.bytes != 0 {
		t.Fatalf("sent %d bytes of db, whose data the peer has (its bitmap entry has a metadata mark only): want 0", sink.bytes)
	}
}

// TestResyncPeerLinkGoneHereNotWhole: two names of one inode on both
// nodes; while the peer was away one name was removed (or renamed) here,
// the data unchanged. The peer's other name is removed (renamed) before
// the comparison writes anything, so the peer's copy can be compared in
// place: it must not be sent whole (hard-link backup rotations remove
// names of large files).
func TestResyncPeerLinkGoneHereNotWhole(t *testing.T) {
	for _, tc := range []struct {
		name string
		do   func(src string) error
	}{
		{"removed", func(src string) error { return os.Remove(filepath.Join(src, "b")) }},
		{"renamed", func(src string) error { return os.Rename(filepath.Join(src, "b"), filepath.Join(src, "c")) }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			top := t.TempDir()
			src, dst := filepath.Join(top, "src"), filepath.Join(top, "dst")
			for _, d := range []string{src, dst} {
				os.Mkdir(d, 0o755)
			}
			writeRandom(t, filepath.Join(src, "a"), 1<<20)
			data, err := os.ReadFile(filepath.Join(src, "a"))
			if err != nil {
				t.Fatal(err)
			}
			if err := os.WriteFile(filepath.Join(dst, "a"), data, 0o644); err != nil {
				t.Fatal(err)
			}
			for _, d := range []string{src, dst} {
				if err := os.Link(filepath.Join(d, "a"), filepath.Join(d, "b")); err != nil {
					t.Fatal(err)
				}
			}
			st, _ := os.Stat(filepath.Join(src, "a"))
			os.Chtimes(filepath.Join(dst, "a"), st.ModTime(), st.ModTime())
			if err := tc.do(src); err != nil {
				t.Fatal(err)
			}
			// The link count changed: a metadata mark on the inode.
			sink, _ := bitmapResync(t, src, dst, attrMarks(t, src, filepath.Join(src, "a")))
			sameTrees(t, src, dst)
			if sink.bytes != 0 {
				t.Fatalf("sent %d bytes of a, unchanged: want 0", sink.bytes)
			}
		})
	}
}

// TestResyncReportPeerLinkedReplaced: a returning old primary changed a
// file of two names after the split, and here the link was broken (b
// replaced, `sed -i b`). Its copy is made anew from this node's a: the
// report must say that the peer's a loses its content, as it does for a
// file written in place or replaced by another type.
func TestResyncReportPeerLinkedReplaced(t *testing.T) {
	src, dst, _ := linkedPeerPair(t)
	cutoff := time.Now().UnixNano()
	time.Sleep(20 * time.Millisecond)
	// The peer's own change, after the split.
	f, err := os.OpenFile(filepath.Join(dst, "a"), os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteAt([]byte("the old primary's own write"), 100); err != nil {
		t.Fatal(err)
	}
	f.Close()
	root, local := scanSource(t, src)
	_, peer := peerManifest(t, dst, wire.ManifestQuery{Cutoff: cutoff})
	b, _ := applyingBuilder(t, root, local, dst)
	ts := &treeSync{dirty: newDirtySet(), window: true, report: true}
	if err := b.fullSync(listingOf(local), listingOf(peer), ts); err != nil {
		t.Fatal(err)
	}
	sameTrees(t, src, dst)
	report := strings.Join(ts.lines, "\n")
	if !strings.Contains(report, "a\t") {
		t.Fatalf("the report does not say the peer's a loses its content:\n%q", report)
	}
}
