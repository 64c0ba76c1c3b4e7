package replica

import (
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"testing"
	"time"

	"github.com/duet-ha/duet/pkg/capture"
	"github.com/duet-ha/duet/pkg/wire"
)

// TestResyncBitmapDirRotated: backup rotation while the peer was away
// (`rm -r b.2; mv b.1 b.2`). The files under the moved directory were not
// touched: no bitmap marks, the same size as the peer's files under their
// names (fixed-size blocks, images, records). Only the root and the moved
// directory have marks. b.2/f is trusted as unchanged and the peer keeps
// the old b.2/f's bytes under it (its mtime is set to this one's: nothing
// on the peer tells it apart afterwards).
func TestResyncBitmapDirRotated(t *testing.T) {
	top := t.TempDir()
	src, dst := filepath.Join(top, "src"), filepath.Join(top, "dst")
	writeRandom(t, filepath.Join(src, "b.1/f"), 5000)
	writeRandom(t, filepath.Join(src, "b.2/f"), 5000)
	if err := os.CopyFS(dst, os.DirFS(src)); err != nil {
		t.Fatal(err)
	}
	// b.1 was made well before (a rename within the coarse clock's tick
	// of its last entry change leaves its ctime equal to its mtime: not
	// told from a change of its entries, docs/DESIGN.md).
	ago := time.Now().Add(-time.Hour)
	os.Chtimes(filepath.Join(src, "b.1"), ago, ago)
	// The peer is away; duet runs and captures the removal and the rename.
	if err := os.RemoveAll(filepath.Join(src, "b.2")); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(filepath.Join(src, "b.1"), filepath.Join(src, "b.2")); err != nil {
		t.Fatal(err)
	}
	// The root's entries changed; the moved directory's ctime (and '..').
	bitmapResync(t, src, dst, attrMarks(t, src, filepath.Join(src, "b.2")))
	sameTrees(t, src, dst)
}

// TestResyncBitmapWrittenThenParentRenamedOver: the log rotation of
// TestResyncBitmapWrittenThenRenamedOver one level up: b.1/d/f appended to,
// then `rm -r b.2; mv b.1 b.2`. f has data marks, but its directory b.2/d
// has none (only b.2 itself, and the root, changed): markBitmapCompared
// trusts f to its chunks, which are applied over the peer's old b.2/d/f
// (here even of another size: the size check only covers files without
// marks).
func TestResyncBitmapWrittenThenParentRenamedOver(t *testing.T) {
	top := t.TempDir()
	src, dst := filepath.Join(top, "src"), filepath.Join(top, "dst")
	writeRandom(t, filepath.Join(src, "b.1/d/f"), 8000)
	writeRandom(t, filepath.Join(src, "b.2/d/f"), 5000)
	if err := os.CopyFS(dst, os.DirFS(src)); err != nil {
		t.Fatal(err)
	}
	f, err := os.OpenFile(filepath.Join(src, "b.1/d/f"), os.O_WRONLY|os.O_APPEND, 0)
	if err != nil {
		t.Fatal(err)
	}
	f.Write(make([]byte, 1000))
	f.Close()
	ino := inoOf(t, filepath.Join(src, "b.1/d/f"))
	ago := time.Now().Add(-time.Hour) // b.1 made well before, as above
	os.Chtimes(filepath.Join(src, "b.1"), ago, ago)
	if err := os.RemoveAll(filepath.Join(src, "b.2")); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(filepath.Join(src, "b.1"), filepath.Join(src, "b.2")); err != nil {
		t.Fatal(err)
	}
	d := attrMarks(t, src, filepath.Join(src, "b.2"))
	d.record(&capture.Record{Kind: capture.KindData, Ino: ino, Pos: 8000, Len: 1000}, 2)
	d.record(&capture.Record{Kind: capture.KindAttr, Ino: ino}, 3)
	bitmapResync(t, src, dst, d)
	sameTrees(t, src, dst)
}

// TestResyncBitmapDbPageNotReadWhole (cost): a database written a page
// while the peer was away, its rollback journal made and removed beside it
// (SQLite's db-journal, each transaction). The directory has marks, so
// markBitmapCompared has the db compared by checksums: read whole on both
// sides for one 4 KiB page (a database of 100 GiB: 100 GiB read on each
// node, on every resync).
func TestResyncBitmapDbPageNotReadWhole(t *testing.T) {
	t.Skip("known cost, not fixed: a file with marks in a directory with marks is compared by checksums, as it may have been renamed over the peer's file; telling a rename from a write needs the peer's names kept durably (docs/DESIGN.md, resync review)")
	top := t.TempDir()
	src, dst := filepath.Join(top, "src"), filepath.Join(top, "dst")
	writeRandom(t, filepath.Join(src, "db"), 8<<20)
	if err := os.CopyFS(dst, os.DirFS(src)); err != nil {
		t.Fatal(err)
	}
	jp := filepath.Join(src, "db-journal")
	writeRandom(t, jp, 4096)
	f, err := os.OpenFile(filepath.Join(src, "db"), os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	f.WriteAt(make([]byte, 4096), 1<<20)
	f.Close()
	os.Remove(jp)
	ino := inoOf(t, filepath.Join(src, "db"))
	d := attrMarks(t, src, filepath.Join(src, "db")) // the root's entries, db's mtime
	d.record(&capture.Record{Kind: capture.KindData, Ino: ino, Pos: 1 << 20, Len: 4096}, 2)
	root, _ := scanSource(t, src)
	local, _, err := scanListing(root, false)
	if err != nil {
		t.Fatal(err)
	}
	want, _ := markBitmapCompared(local, d, nil)
	bitmapResync(t, src, dst, d)
	sameTrees(t, src, dst)
	if slices.Contains(want, "db") {
		t.Fatalf("db (8 MiB, one 4 KiB page written, never renamed) is read whole on both sides to be compared by checksums (wanted: %q): a journal made and removed beside it marked the directory", want)
	}
}

// TestResyncBitmapManyWrittenNoEscalation (cost): a directory of more than
// wire.MaxWant files written in place while the peer was away (a mail or
// object store), and one entry made or removed in it. Every file is named
// for checksums: fullSync escalates to a comparison of every file of the
// tree (read on both nodes), where the bitmap's chunks were sent before.
func TestResyncBitmapManyWrittenNoEscalation(t *testing.T) {
	t.Skip("known cost, not fixed: as TestResyncBitmapDbPageNotReadWhole; beyond wire.MaxWant such files the resync compares every file, which is correct but reads both trees (docs/DESIGN.md, resync review)")
	es := []wire.Entry{
		{Path: ".", Ino: 1, Mode: fs.ModeDir | 0o755},
		{Path: "d", Ino: 2, Mode: fs.ModeDir | 0o755},
	}
	d := newDirtySet()
	d.record(&capture.Record{Kind: capture.KindAttr, Ino: 2}, 1)
	n := wire.MaxWant + 1
	for i := range n {
		ino := uint64(100 + i)
		es = append(es, wire.Entry{Path: fmt.Sprintf("d/f%07d", i), Ino: ino, Mode: 0o644, Size: 8192, Mtime: 5, Ctime: 5})
		d.record(&capture.Record{Kind: capture.KindData, Ino: ino, Pos: 0, Len: 100}, 2)
	}
	paths, _ := markBitmapCompared(listingOf(es), d, nil)
	if len(paths) > wire.MaxWant {
		t.Fatalf("%d paths named for checksums (limit %d): the resync escalates to comparing every file of the tree", len(paths), wire.MaxWant)
	}
}
