package replica

import (
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/duet-ha/duet/pkg/journal"
	"golang.org/x/sys/unix"
)

func statOf(t *testing.T, p string) unix.Stat_t {
	t.Helper()
	var st unix.Stat_t
	if err := unix.Stat(p, &st); err != nil {
		t.Fatal(err)
	}
	return st
}

func sameAttrs(t *testing.T, what, a, b string) {
	t.Helper()
	x, y := statOf(t, a), statOf(t, b)
	if x.Size != y.Size || x.Mode != y.Mode || x.Mtim != y.Mtim || x.Atim != y.Atim {
		t.Fatalf("%s: primary size %d mode %o mtime %v atime %v, peer size %d mode %o mtime %v atime %v",
			what, x.Size, x.Mode, x.Mtim, x.Atim, y.Size, y.Mode, y.Mtim, y.Atim)
	}
}

// cachingPair is syncedPair with a builder that keeps an attribute cache.
func cachingPair(t *testing.T, files ...string) (src, dst string, b *builder, sink *applySink) {
	t.Helper()
	src, dst, b, sink = syncedPair(t, files...)
	b.shipped = attrCache{}
	return src, dst, b, sink
}

func runPass(t *testing.T, b *builder, files ...journal.File) {
	t.Helper()
	if _, err := b.build(files); err != nil {
		t.Fatal(err)
	}
}

// Hard links linked on both sides: setattr by the first name, that name
// removed, an attribute-only record then skipped: the peer's other name
// is the same inode and has the attributes.
func TestAttrCacheHardLinkFirstNameRemoved(t *testing.T) {
	top := t.TempDir()
	src, dst := filepath.Join(top, "src"), filepath.Join(top, "dst")
	for _, d := range []string{src, dst} {
		os.Mkdir(d, 0o755)
		writeRandom(t, filepath.Join(d, "a"), 100)
		os.Link(filepath.Join(d, "a"), filepath.Join(d, "b"))
	}
	data, _ := os.ReadFile(filepath.Join(src, "a"))
	os.WriteFile(filepath.Join(dst, "a"), data, 0o644)
	root, local := scanSource(t, src)
	b, sink := applyingBuilder(t, root, local, dst)
	b.shipped = attrCache{}
	os.Chmod(filepath.Join(src, "a"), 0o600)
	attr := changed(t, filepath.Join(src, "a"))
	runPass(t, b, attr)
	os.Remove(filepath.Join(src, "a"))
	n := len(sink.ops)
	runPass(t, b, changed(t, src), attr)
	t.Logf("second pass: %v", sink.ops[n:])
	sameTrees(t, src, dst)
	sameAttrs(t, "b", filepath.Join(src, "b"), filepath.Join(dst, "b"))
}

// A number reused at once (ext4): f removed, g made with f's number and
// given f's size, mode and times; the allocation record retires the old
// node and create forgets the number.
func TestAttrCacheReusedNumberSameAttrs(t *testing.T) {
	src, dst, b, sink := cachingPair(t, "f", "x")
	f := filepath.Join(src, "f")
	attr := changed(t, f)
	os.Chmod(f, 0o640)
	runPass(t, b, attr)
	old := statOf(t, f)
	os.Remove(f)
	g := filepath.Join(src, "g")
	writeRandom(t, g, 100)
	if st := statOf(t, g); st.Ino != old.Ino {
		t.Skipf("number not reused (%d, %d)", st.Ino, old.Ino)
	}
	os.Chmod(g, 0o640)
	unix.UtimesNano(g, []unix.Timespec{old.Atim, old.Mtim})
	e := changed(t, g)
	e.NewSeq = 1
	n := len(sink.ops)
	runPass(t, b, changed(t, src), e)
	t.Logf("reuse pass: %v", sink.ops[n:])
	runPass(t, b) // the old file's aside goes
	sameTrees(t, src, dst)
	sameAttrs(t, "g", g, filepath.Join(dst, "g"))
}

// A truncate reported by its tail alone ships the size without the times
// (the peer's truncate moves its copy's): an attribute-only record after
// it, the times set back to those last shipped, must ship them.
func TestAttrCacheTailThenTimesBack(t *testing.T) {
	src, dst, b, _ := cachingPair(t, "f")
	f := filepath.Join(src, "f")
	attr := changed(t, f)
	runPass(t, b, attr)
	old := statOf(t, f)
	data, _ := os.ReadFile(f)
	os.Truncate(f, 50)
	fh, _ := os.OpenFile(f, os.O_WRONLY, 0)
	fh.WriteAt(data[50:], 50)
	fh.Close()
	tail := journal.File{Key: attr.Key, Tail: 50, HasTail: true, MaxSeq: 2}
	time.Sleep(20 * time.Millisecond)
	runPass(t, b, tail)
	unix.UtimesNano(f, []unix.Timespec{old.Atim, old.Mtim})
	runPass(t, b, attr)
	sameAttrs(t, "f", f, filepath.Join(dst, "f"))
}

// Rescan: the whole file and the setattr; a later attribute-only record
// with nothing changed ships nothing and the copies agree.
func TestAttrCacheRescanThenSame(t *testing.T) {
	src, dst, b, sink := cachingPair(t, "f")
	f := filepath.Join(src, "f")
	r := changed(t, f)
	r.Rescan = true
	runPass(t, b, r)
	n := len(sink.ops)
	runPass(t, b, changed(t, f))
	if len(sink.ops) != n {
		t.Fatalf("shipped %v", sink.ops[n:])
	}
	sameAttrs(t, "f", f, filepath.Join(dst, "f"))
}
