package replica

import (
	"crypto/rand"
	"fmt"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/duet-ha/duet/pkg/capture"
	"github.com/duet-ha/duet/pkg/wire"
	"golang.org/x/sys/unix"
)

// linkedPeerPair is a tree src with files a and b, and its copy dst where
// a and b are two names of one inode (as src had them until b was
// replaced, below), with the same mtimes; cutoff is after both were made.
func linkedPeerPair(t *testing.T) (src, dst string, cutoff int64) {
	t.Helper()
	top := t.TempDir()
	src, dst = filepath.Join(top, "src"), filepath.Join(top, "dst")
	writeRandom(t, filepath.Join(src, "a"), 3*wire.BlockSize)
	if err := os.Link(filepath.Join(src, "a"), filepath.Join(src, "b")); err != nil {
		t.Fatal(err)
	}
	os.Mkdir(dst, 0o755)
	data, err := os.ReadFile(filepath.Join(src, "a"))
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dst, "a"), data, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Link(filepath.Join(dst, "a"), filepath.Join(dst, "b")); err != nil {
		t.Fatal(err)
	}
	st, _ := os.Stat(filepath.Join(src, "a"))
	os.Chtimes(filepath.Join(dst, "a"), st.ModTime(), st.ModTime())
	cutoff = time.Now().UnixNano()
	time.Sleep(50 * time.Millisecond)
	// b is replaced by a new file (an editor's save, `sed -i`): a keeps
	// its bytes, b is another inode here; on the peer both names are
	// still one inode.
	writeRandom(t, filepath.Join(src, "b.tmp"), 3*wire.BlockSize)
	if err := os.Rename(filepath.Join(src, "b.tmp"), filepath.Join(src, "b")); err != nil {
		t.Fatal(err)
	}
	return src, dst, cutoff
}

// Two names of one inode on the peer that are two files here (the link
// was broken while the peer was away: `sed -i b`): the comparison writes
// b's differing blocks (or the bitmap's chunks) into the peer's b in
// place, which is also the peer's a, compared (equal) just before: the
// peer's a ends with b's bytes. In every mode.
// Nothing on the primary changes afterwards; the journal has nothing to
// mend it with.
func TestResyncPeerHardLinkBrokenHere(t *testing.T) {
	t.Run("recent", func(t *testing.T) {
		src, dst, cutoff := linkedPeerPair(t)
		windowResync(t, src, dst, cutoff)
		sameTrees(t, src, dst)
	})
	t.Run("bitmap", func(t *testing.T) {
		// b replaced while duet ran: the new inode's writes are in
		// the bitmap, a's inode has only a metadata change (its link
		// count).
		src, dst, _ := linkedPeerPair(t)
		root, local := scanSource(t, src)
		d := newDirtySet()
		var st unix.Stat_t
		for _, p := range []string{src, filepath.Join(src, "a")} {
			if err := unix.Stat(p, &st); err != nil {
				t.Fatal(err)
			}
			d.record(&capture.Record{Kind: capture.KindAttr, Ino: st.Ino}, 1)
		}
		if err := unix.Stat(filepath.Join(src, "b"), &st); err != nil {
			t.Fatal(err)
		}
		d.record(&capture.Record{Kind: capture.KindData, Ino: st.Ino, Pos: 0, Len: uint64(st.Size)}, 1)
		_, peer := peerManifest(t, dst, wire.ManifestQuery{})
		b, _ := applyingBuilder(t, root, nil, dst)
		if err := b.fullSync(listingOf(local), listingOf(peer), &treeSync{dirty: d, window: true}); err != nil {
			t.Fatal(err)
		}
		sameTrees(t, src, dst)
	})
	t.Run("full", func(t *testing.T) {
		src, dst, _ := linkedPeerPair(t)
		root, _ := scanSource(t, src)
		local, _, err := scanListing(root, false)
		if err != nil {
			t.Fatal(err)
		}
		_, pe := peerManifest(t, dst, wire.ManifestQuery{All: true})
		s := newLocalSums(root, local)
		s.match(pe)
		if err := s.wait(); err != nil {
			t.Fatal(err)
		}
		b, _ := applyingBuilder(t, root, nil, dst)
		if err := b.fullSync(local, listingOf(pe), &treeSync{sumMatched: true}); err != nil {
			t.Fatal(err)
		}
		sameTrees(t, src, dst)
	})
}

// A file sent whole over a copy the peer has: sendWhole sets the size and
// ships the data extents, skipping holes, so where the file now has a
// hole the peer keeps its old bytes. Here the file was made sparse
// (truncated and rewritten at its first block, its mtime set back) and
// renamed while nothing captured it: paired with the peer's file of the
// old name, which has no checksums, it is sent whole (6b38e1a), and the
// peer's n keeps o's old blocks 1 and 2.
func TestResyncWholeOverSparse(t *testing.T) {
	top := t.TempDir()
	src, dst := filepath.Join(top, "src"), filepath.Join(top, "dst")
	writeRandom(t, filepath.Join(src, "o"), 3*wire.BlockSize)
	if err := os.CopyFS(dst, os.DirFS(src)); err != nil {
		t.Fatal(err)
	}
	st, err := os.Stat(filepath.Join(src, "o"))
	if err != nil {
		t.Fatal(err)
	}
	os.Chtimes(filepath.Join(dst, "o"), st.ModTime(), st.ModTime())
	cutoff := time.Now().UnixNano()
	time.Sleep(50 * time.Millisecond)
	f, err := os.OpenFile(filepath.Join(src, "o"), os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	block := make([]byte, wire.BlockSize)
	rand.Read(block)
	if err := f.Truncate(0); err != nil {
		t.Fatal(err)
	}
	if err := f.Truncate(st.Size()); err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteAt(block, 0); err != nil {
		t.Fatal(err)
	}
	f.Close()
	os.Chtimes(filepath.Join(src, "o"), st.ModTime(), st.ModTime())
	if err := os.Rename(filepath.Join(src, "o"), filepath.Join(src, "n")); err != nil {
		t.Fatal(err)
	}
	want, ops := windowResync(t, src, dst, cutoff)
	requireRenamed(t, ops, "o", "n", want)
	sameTrees(t, src, dst)
}

// A file renamed over another while the peer was away and duet ran (a
// log rotation's `mv app.log.1 app.log.2`, a swap): the path the peer has
// now holds another local inode, one the peer had durably (its bitmap
// entry holds the rename's metadata change only). The comparison paired
// by path and trusted the bitmap of the inode now there: nothing of it
// was sent (at a different size, only the size: the bitmap "says why"),
// and the peer kept the replaced file's bytes under the name ("log.2:
// content differs at offset 0"). Now an inode with only metadata marks
// whose ctime is not its mtime is compared by checksums (markMoved).
// (One renamed over after writes while the peer was away has data marks
// and is still trusted to them: docs/DESIGN.md, open.)
func TestResyncBitmapRenameOver(t *testing.T) {
	for _, size := range []int{5000, 7000} {
		t.Run(fmt.Sprintf("size%d", size), func(t *testing.T) { renameOver(t, size) })
	}
}

// renameOver runs TestResyncBitmapRenameOver with log.1 of size bytes.
func renameOver(t *testing.T, size int) {
	top := t.TempDir()
	src, dst := filepath.Join(top, "src"), filepath.Join(top, "dst")
	writeRandom(t, filepath.Join(src, "log.1"), size)
	writeRandom(t, filepath.Join(src, "log.2"), 5000)
	// log.1 is the older (timestamps of two writes in a row may be one
	// clock tick).
	hourAgo := time.Now().Add(-time.Hour)
	os.Chtimes(filepath.Join(src, "log.1"), hourAgo, hourAgo)
	if err := os.CopyFS(dst, os.DirFS(src)); err != nil {
		t.Fatal(err)
	}
	for _, p := range []string{"log.1", "log.2"} {
		st, _ := os.Stat(filepath.Join(src, p))
		os.Chtimes(filepath.Join(dst, p), st.ModTime(), st.ModTime())
	}
	// The peer is away; duet runs and captures the rename.
	if err := os.Rename(filepath.Join(src, "log.1"), filepath.Join(src, "log.2")); err != nil {
		t.Fatal(err)
	}
	// What capture reports of the rename: both directories' and the
	// moved inode's metadata (its ctime; ext4_mark_inode_dirty).
	bitmapResync(t, src, dst, attrMarks(t, src, filepath.Join(src, "log.2")))
	sameTrees(t, src, dst)
}
