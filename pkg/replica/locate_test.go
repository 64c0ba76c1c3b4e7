package replica

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/duet-ha/duet/pkg/capture"
	"github.com/duet-ha/duet/pkg/fstree"
	"github.com/duet-ha/duet/pkg/journal"
	"golang.org/x/sys/unix"
)

// bigFrom makes every directory of sh holding n entries or more big, as if
// bigDirEntries were n.
func bigFrom(sh *shadow, n int) {
	sh.bigAt = n
	for ino := range sh.dirs {
		sh.markBig(ino)
	}
}

// inodeRecord is what capture reports of the inode at path as it is now:
// its update, with its generation, and its allocation if isNew.
func inodeRecord(t *testing.T, path string, isNew bool) journal.File {
	t.Helper()
	var st unix.Stat_t
	if err := unix.Lstat(path, &st); err != nil {
		t.Fatal(err)
	}
	d, err := os.Open(filepath.Dir(path))
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	_, gen, ok := fstree.Generation(int(d.Fd()), filepath.Base(path))
	if !ok {
		t.Fatalf("no generation for %s", path)
	}
	f := journal.File{Key: capture.InodeKey{Ino: st.Ino}, Attr: true, MaxSeq: 2, Gen: gen, HasGen: true}
	if isNew {
		f.NewSeq, f.NewGen = 2, gen
	}
	return f
}

// needsHandles skips a test when this process cannot open files by handle
// (open_by_handle_at needs CAP_DAC_READ_SEARCH): the pass would read every
// big directory whole.
func needsHandles(t *testing.T, dir string) {
	t.Helper()
	d, err := os.Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	h, _, err := unix.NameToHandleAt(int(d.Fd()), "", unix.AT_EMPTY_PATH)
	if err == nil {
		var fd int
		fd, err = unix.OpenByHandleAt(int(d.Fd()), h, unix.O_PATH)
		if err == nil {
			unix.Close(fd)
		}
	}
	if err != nil {
		t.Skipf("opening files by handle: %v (needs CAP_DAC_READ_SEARCH)", err)
	}
}

// bigDirCases are changes in a big directory ("huge", with "small"
// beside it) and the records capture makes of them.
var bigDirCases = []struct {
	name string
	// change makes the change under src and returns the records
	// of the inodes it updated (huge's own is added).
	change func(t *testing.T, src string) []journal.File
	bytes  int // shipped, -1: not checked
}{
	{"create", func(t *testing.T, src string) []journal.File {
		writeRandom(t, filepath.Join(src, "huge/new"), 50)
		return []journal.File{inodeRecord(t, filepath.Join(src, "huge/new"), true)}
	}, 50},
	{"unlink", func(t *testing.T, src string) []journal.File {
		r := inodeRecord(t, filepath.Join(src, "huge/a"), false)
		mustDo(t, os.Remove(filepath.Join(src, "huge/a")))
		return []journal.File{r}
	}, 0},
	{"rename within", func(t *testing.T, src string) []journal.File {
		mustDo(t, os.Rename(filepath.Join(src, "huge/a"), filepath.Join(src, "huge/z")))
		return []journal.File{inodeRecord(t, filepath.Join(src, "huge/z"), false)}
	}, 0},
	{"rename over", func(t *testing.T, src string) []journal.File {
		over := inodeRecord(t, filepath.Join(src, "huge/b"), false)
		mustDo(t, os.Rename(filepath.Join(src, "huge/a"), filepath.Join(src, "huge/b")))
		return []journal.File{over, inodeRecord(t, filepath.Join(src, "huge/b"), false)}
	}, 0},
	{"exchange", func(t *testing.T, src string) []journal.File {
		mustDo(t, unix.Renameat2(unix.AT_FDCWD, filepath.Join(src, "huge/a"), unix.AT_FDCWD, filepath.Join(src, "huge/b"), unix.RENAME_EXCHANGE))
		return []journal.File{inodeRecord(t, filepath.Join(src, "huge/a"), false), inodeRecord(t, filepath.Join(src, "huge/b"), false)}
	}, -1}, // one of the two is sent again, as when the directory is read whole
	{"move out to a small directory", func(t *testing.T, src string) []journal.File {
		mustDo(t, os.Rename(filepath.Join(src, "huge/a"), filepath.Join(src, "small/a")))
		return []journal.File{changed(t, filepath.Join(src, "small")), inodeRecord(t, filepath.Join(src, "small/a"), false)}
	}, 0},
	{"move in from a small directory", func(t *testing.T, src string) []journal.File {
		mustDo(t, os.Rename(filepath.Join(src, "small/s"), filepath.Join(src, "huge/s")))
		return []journal.File{changed(t, filepath.Join(src, "small")), inodeRecord(t, filepath.Join(src, "huge/s"), false)}
	}, 0},
	{"move in from outside the tree", func(t *testing.T, src string) []journal.File {
		out := filepath.Join(filepath.Dir(src), "outside")
		writeRandom(t, out, 70)
		mustDo(t, os.Rename(out, filepath.Join(src, "huge/o")))
		return []journal.File{inodeRecord(t, filepath.Join(src, "huge/o"), false)}
	}, 70},
	{"move out of the tree", func(t *testing.T, src string) []journal.File {
		out := filepath.Join(filepath.Dir(src), "outside")
		mustDo(t, os.Rename(filepath.Join(src, "huge/a"), out))
		return []journal.File{inodeRecord(t, out, false)}
	}, 0},
	{"hard link", func(t *testing.T, src string) []journal.File {
		mustDo(t, os.Link(filepath.Join(src, "huge/a"), filepath.Join(src, "huge/l")))
		return []journal.File{inodeRecord(t, filepath.Join(src, "huge/a"), false)}
	}, 0},
	{"hard link out of the tree", func(t *testing.T, src string) []journal.File {
		mustDo(t, os.Link(filepath.Join(src, "huge/a"), filepath.Join(filepath.Dir(src), "outside")))
		return []journal.File{inodeRecord(t, filepath.Join(src, "huge/a"), false)}
	}, 0},
	{"directory with content", func(t *testing.T, src string) []journal.File {
		writeRandom(t, filepath.Join(src, "huge/nd/f"), 30)
		return []journal.File{inodeRecord(t, filepath.Join(src, "huge/nd"), true), inodeRecord(t, filepath.Join(src, "huge/nd/f"), true)}
	}, 30},
	{"symlink", func(t *testing.T, src string) []journal.File {
		mustDo(t, os.Symlink("a", filepath.Join(src, "huge/sym")))
		return []journal.File{inodeRecord(t, filepath.Join(src, "huge/sym"), true)}
	}, 0},
	{"directory renamed away and made again", func(t *testing.T, src string) []journal.File {
		mustDo(t, os.Rename(filepath.Join(src, "huge/sub"), filepath.Join(src, "huge/sub.old")))
		writeRandom(t, filepath.Join(src, "huge/sub/n"), 20)
		return []journal.File{inodeRecord(t, filepath.Join(src, "huge/sub.old"), false),
			inodeRecord(t, filepath.Join(src, "huge/sub"), true), inodeRecord(t, filepath.Join(src, "huge/sub/n"), true)}
	}, 20},
}

// TestBigDirChanges: in a big directory each kind of change reaches the
// peer from the records capture makes of it (the directory's update and
// its inodes'), and the directory is not read whole: a file made in it
// whose records have not come yet is not shipped until they do.
func TestBigDirChanges(t *testing.T) {
	for _, tc := range bigDirCases {
		t.Run(tc.name, func(t *testing.T) {
			top := t.TempDir()
			testBigDirCase(t, top, top, tc.change, tc.bytes)
		})
	}
}

// The same on each filesystem duet replicates.
func TestBigDirChangesOnEachFS(t *testing.T) {
	onEachFS(t, func(t *testing.T, mnt string) {
		for _, tc := range bigDirCases {
			t.Run(tc.name, func(t *testing.T) {
				top := filepath.Join(mnt, strings.ReplaceAll(tc.name, " ", "-"))
				mustDo(t, os.Mkdir(top, 0o755))
				testBigDirCase(t, top, t.TempDir(), tc.change, tc.bytes)
			})
		}
	})
}

func testBigDirCase(t *testing.T, srcTop, dstTop string, change func(t *testing.T, src string) []journal.File, bytes int) {
	src, dst, b, sink := syncedPairIn(t, srcTop, dstTop, "huge/a", "huge/b", "huge/c", "huge/sub/x", "small/s")
	needsHandles(t, src)
	bigFrom(b.sh, 4)
	if !b.sh.big[inoOf(t, filepath.Join(src, "huge"))] || b.sh.big[inoOf(t, filepath.Join(src, "small"))] {
		t.Fatalf("big directories %v: want huge only", b.sh.big)
	}
	unreported := filepath.Join(src, "huge/unreported")
	writeRandom(t, unreported, 10)
	files := append(change(t, src), changed(t, filepath.Join(src, "huge")))
	if _, err := b.build(files); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Lstat(filepath.Join(dst, "huge/unreported")); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("a file whose records have not come was shipped (%v): the pass read the big directory whole", err)
	}
	if bytes >= 0 && sink.bytes != bytes {
		t.Errorf("shipped %d bytes, want %d (%v)", sink.bytes, bytes, sink.ops)
	}
	if _, err := b.build([]journal.File{inodeRecord(t, unreported, true), changed(t, filepath.Join(src, "huge"))}); err != nil {
		t.Fatal(err)
	}
	sameTrees(t, src, dst)
}

func mustDo(t *testing.T, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

// When an inode's names cannot all be found (two new links made in one
// pass: the dentry cache shows one), or a pass holds more inodes than
// placing them is worth, the pass reads every big directory whole, and
// nothing is missed.
func TestBigDirReadWhole(t *testing.T) {
	for _, tc := range []struct {
		name   string
		change func(t *testing.T, src string) []journal.File
	}{
		{"two new links", func(t *testing.T, src string) []journal.File {
			mustDo(t, os.Link(filepath.Join(src, "huge/a"), filepath.Join(src, "huge/l1")))
			mustDo(t, os.Link(filepath.Join(src, "huge/a"), filepath.Join(src, "huge/l2")))
			return []journal.File{inodeRecord(t, filepath.Join(src, "huge/a"), false)}
		}},
		{"many inodes", func(t *testing.T, src string) []journal.File {
			var files []journal.File
			for i := range placeCost + 1 {
				p := filepath.Join(src, "huge", fmt.Sprint("n", i))
				writeRandom(t, p, 1)
				files = append(files, inodeRecord(t, p, true))
			}
			return files
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			src, dst, b, _ := syncedPair(t, "huge/a", "huge/b", "huge/c", "other/x", "other/y", "other/z")
			needsHandles(t, src)
			bigFrom(b.sh, 3)
			// Changed with no record of its own yet: only a whole
			// reading finds it.
			writeRandom(t, filepath.Join(src, "other/unreported"), 10)
			files := append(tc.change(t, src), changed(t, filepath.Join(src, "huge")))
			if _, err := b.build(files); err != nil {
				t.Fatal(err)
			}
			sameTrees(t, src, dst)
		})
	}
}

// A directory becomes big only when read whole: it saw every change until
// then. Looking up names in it does not make it big.
func TestBigOnlyWhenReadWhole(t *testing.T) {
	src, dst, b, _ := syncedPair(t, "big/1", "big/2", "big/3", "d/a", "d/b", "huge/a")
	needsHandles(t, src)
	bigFrom(b.sh, 3)
	d, huge := inoOf(t, filepath.Join(src, "d")), inoOf(t, filepath.Join(src, "huge"))
	writeRandom(t, filepath.Join(src, "d/c"), 10)
	writeRandom(t, filepath.Join(src, "huge/b"), 10)
	writeRandom(t, filepath.Join(src, "huge/c"), 10)
	// Placed by their own records; their directories' are not in the
	// pass yet.
	files := []journal.File{inodeRecord(t, filepath.Join(src, "d/c"), true),
		inodeRecord(t, filepath.Join(src, "huge/b"), true), inodeRecord(t, filepath.Join(src, "huge/c"), true)}
	if _, err := b.build(files); err != nil {
		t.Fatal(err)
	}
	sameTrees(t, src, dst)
	if b.sh.big[d] || b.sh.big[huge] {
		t.Fatalf("d big %v, huge big %v: grown by lookups, want neither", b.sh.big[d], b.sh.big[huge])
	}
	if _, err := b.build([]journal.File{changed(t, filepath.Join(src, "d"))}); err != nil {
		t.Fatal(err)
	}
	if !b.sh.big[d] {
		t.Fatal("d read whole with 3 entries is not big")
	}
}

func TestHandleFor(t *testing.T) {
	root := []byte{1, 1, 0, 0, 0, 0, 0, 0, 5, 0, 0, 0, 0, 0, 0, 0, 0x0b, 0, 0, 0}
	for _, tc := range []struct {
		typ  int32
		root []byte
		ino  uint64
		gen  uint32
		want []byte
	}{
		{1, []byte{2, 0, 0, 0, 9, 0, 0, 0}, 0x0c, 0x12345678, []byte{0x0c, 0, 0, 0, 0x78, 0x56, 0x34, 0x12}},
		{1, []byte{2, 0, 0, 0, 9, 0, 0, 0}, 1 << 32, 1, nil}, // does not fit
		{0x81, []byte{0x80, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0}, 0x100000083, 7, []byte{0x83, 0, 0, 0, 1, 0, 0, 0, 7, 0, 0, 0}},
		{0x4d, root, 0x102, 9, []byte{2, 1, 0, 0, 0, 0, 0, 0, 5, 0, 0, 0, 0, 0, 0, 0, 9, 0, 0, 0}},
		{0x4d, root[:16], 0x102, 9, nil},                                       // short
		{2, []byte{2, 0, 0, 0, 9, 0, 0, 0, 2, 0, 0, 0, 9, 0, 0, 0}, 3, 4, nil}, // with the parent: not made
	} {
		got, ok := handleFor(tc.typ, tc.root, tc.ino, tc.gen)
		if ok != (tc.want != nil) || !bytes.Equal(got, tc.want) {
			t.Errorf("handleFor(%#x, % x, %#x, %#x) = % x, %v; want % x", tc.typ, tc.root, tc.ino, tc.gen, got, ok, tc.want)
		}
	}
}

// Placing an inode whose name is outside the tree (same filesystem) reads
// its directory there: that reading must not move the directory's access
// time, or the capture (which goes by device) reports it, and the next
// pass places that directory by reading its parent, one level up each
// pass. From a review of the O_NOATIME change.
func TestLocateOutsideLeavesAccessTime(t *testing.T) {
	top := t.TempDir()
	src, _, b, _ := syncedPairIn(t, top, top, "huge/a", "huge/b", "huge/c", "huge/d")
	needsHandles(t, src)
	bigFrom(b.sh, 4)
	outDir := filepath.Join(top, "outside")
	writeRandom(t, filepath.Join(outDir, "x"), 10)
	old := time.Date(2020, 1, 2, 3, 4, 5, 0, time.UTC)
	if err := os.Chtimes(outDir, old, time.Now()); err != nil {
		t.Fatal(err)
	}
	if _, err := b.build([]journal.File{inodeRecord(t, filepath.Join(outDir, "x"), false)}); err != nil {
		t.Fatal(err)
	}
	if got := atime(t, outDir); !got.Equal(old) {
		t.Fatalf("placing an inode outside the tree moved %s's access time from %v to %v", outDir, old, got)
	}
}
