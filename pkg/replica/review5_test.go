package replica

import (
	"os"
	"path/filepath"
	"testing"

	"github.com/duet-ha/duet/pkg/capture"
)

// TestResyncBitmapWrittenThenRenamedOver: log rotation while the peer was
// away. log.1 was appended to, then renamed over log.2 (`mv log.1
// log.2`). The moved inode's bitmap entry holds the append's chunks and
// the rename's metadata mark; the peer holds the old log.2 under the
// name. Trusted to its chunks, the peer kept the old log.2's first bytes
// under the new log.2 ("content differs at offset 0").
func TestResyncBitmapWrittenThenRenamedOver(t *testing.T) {
	top := t.TempDir()
	src, dst := filepath.Join(top, "src"), filepath.Join(top, "dst")
	writeRandom(t, filepath.Join(src, "log.1"), 8000)
	writeRandom(t, filepath.Join(src, "log.2"), 5000)
	if err := os.CopyFS(dst, os.DirFS(src)); err != nil {
		t.Fatal(err)
	}
	// The peer is away; duet runs and captures the append and the rename.
	f, err := os.OpenFile(filepath.Join(src, "log.1"), os.O_WRONLY|os.O_APPEND, 0)
	if err != nil {
		t.Fatal(err)
	}
	f.Write(make([]byte, 1000))
	f.Close()
	moved := inoOf(t, filepath.Join(src, "log.1"))
	if err := os.Rename(filepath.Join(src, "log.1"), filepath.Join(src, "log.2")); err != nil {
		t.Fatal(err)
	}
	d := attrMarks(t, src, filepath.Join(src, "log.2"))
	d.record(&capture.Record{Kind: capture.KindData, Ino: moved, Pos: 8000, Len: 1000}, 2)
	bitmapResync(t, src, dst, d)
	sameTrees(t, src, dst)
}

// TestResyncBitmapMadeAnewSparse: while the peer was away the file was
// removed and made anew under its name, written at 8 KiB only (a hole
// before). The new inode's chunks say nothing of the peer's file under
// the name: trusted to them, the peer kept the old file's first 8 KiB
// where this one has a hole.
func TestResyncBitmapMadeAnewSparse(t *testing.T) {
	top := t.TempDir()
	src, dst := filepath.Join(top, "src"), filepath.Join(top, "dst")
	writeRandom(t, filepath.Join(src, "f"), 12000)
	if err := os.CopyFS(dst, os.DirFS(src)); err != nil {
		t.Fatal(err)
	}
	os.Remove(filepath.Join(src, "f"))
	g, err := os.Create(filepath.Join(src, "f"))
	if err != nil {
		t.Fatal(err)
	}
	g.WriteAt(make([]byte, 100), 8192)
	g.Close()
	ino := inoOf(t, filepath.Join(src, "f"))
	d := attrMarks(t, src)
	d.record(&capture.Record{Kind: capture.KindNew, Ino: ino}, 2)
	d.record(&capture.Record{Kind: capture.KindData, Ino: ino, Pos: 8192, Len: 100}, 3)
	bitmapResync(t, src, dst, d)
	sameTrees(t, src, dst)
}
