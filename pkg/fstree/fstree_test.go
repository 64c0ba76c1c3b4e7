package fstree

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/duet-ha/duet/pkg/loopfs"
	"github.com/duet-ha/duet/pkg/wire"
	"golang.org/x/sys/unix"
)

// deepTree builds under dir nested directories of 255-byte names whose
// path passes minLen bytes, with a file at the bottom, using *at calls (a
// path past PATH_MAX cannot be looked up at once). It returns the file's
// path relative to dir.
func deepTree(t *testing.T, dir string, minLen int, content []byte) string {
	t.Helper()
	fd, err := unix.Open(dir, unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for i := 0; len(names)*256 <= minLen; i++ {
		name := strings.Repeat(string(rune('a'+i%26)), 255)
		if err := unix.Mkdirat(fd, name, 0o755); err != nil {
			t.Fatal(err)
		}
		sub, err := unix.Openat(fd, name, unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
		unix.Close(fd)
		if err != nil {
			t.Fatal(err)
		}
		fd, names = sub, append(names, name)
	}
	defer unix.Close(fd)
	f, err := unix.Openat(fd, "file", unix.O_CREAT|unix.O_WRONLY|unix.O_CLOEXEC, 0o644)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(f)
	if _, err := unix.Write(f, content); err != nil {
		t.Fatal(err)
	}
	// t.TempDir's cleanup (os.RemoveAll) copes with the depth.
	return strings.Join(append(names, "file"), "/")
}

// A tree whose paths pass PATH_MAX scans: every lookup is relative to
// its parent directory's descriptor.
func TestScanDeepTree(t *testing.T) {
	dir := t.TempDir()
	deep := deepTree(t, dir, 2*unix.PathMax, []byte("at the bottom"))
	root, err := OpenRoot(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer root.Close()
	entries, tooLong, err := Scan(root, true)
	if err != nil {
		t.Fatalf("scanning a tree with a %d-byte path: %v", len(deep), err)
	}
	if tooLong != 0 {
		t.Fatalf("%d entries left out as too long, want none", tooLong)
	}
	last := entries[len(entries)-1]
	if last.Path != deep || !last.Mode.IsRegular() || last.Size != 13 || last.Flags&wire.EntrySummed == 0 {
		t.Fatalf("last entry %.40q… (%d bytes) %v size %d flags %d, want the summed %d-byte file", last.Path, len(last.Path), last.Mode, last.Size, last.Flags, len(deep))
	}
	if want := SumBlock([]byte("at the bottom")); len(last.Sums) != 1 || last.Sums[0] != want {
		t.Fatalf("sums %x, want %x", last.Sums, want)
	}
	if len(entries) != strings.Count(deep, "/")+2 {
		t.Fatalf("%d entries, want %d", len(entries), strings.Count(deep, "/")+2)
	}
}

// OpenBeneath takes a path longer than one lookup takes, and stays
// beneath the root all the same.
func TestOpenBeneathLongPath(t *testing.T) {
	top := t.TempDir()
	dir := filepath.Join(top, "root")
	os.Mkdir(dir, 0o755)
	deep := deepTree(t, dir, 2*unix.PathMax, []byte("x"))
	root, err := OpenRoot(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer root.Close()
	f, err := OpenBeneath(root, deep, unix.O_RDONLY|unix.O_NOFOLLOW)
	if err != nil {
		t.Fatalf("opening a %d-byte path: %v", len(deep), err)
	}
	f.Close()
	// A directory's path with its slash where a group ends (16 names of
	// 255 bytes are 4095 bytes), as the applier asks for a parent.
	if deep[unix.PathMax-1] != '/' {
		t.Fatalf("test tree: byte %d is %q, want a slash", unix.PathMax-1, deep[unix.PathMax-1])
	}
	if d, err := OpenBeneath(root, deep[:unix.PathMax], unix.O_PATH|unix.O_DIRECTORY); err != nil {
		t.Fatalf("opening a directory by a %d-byte path ending in a slash: %v", unix.PathMax, err)
	} else {
		d.Close()
	}
	if st, err := Stat(root, deep); err != nil || st.Size != 1 {
		t.Fatalf("stat of a %d-byte path: size %d, %v", len(deep), st.Size, err)
	}
	// A symlink deep down, where a later group of components starts.
	parent := deep[:strings.LastIndexByte(deep, '/')]
	pd, err := OpenBeneath(root, parent, unix.O_PATH|unix.O_DIRECTORY)
	if err != nil {
		t.Fatal(err)
	}
	os.WriteFile(filepath.Join(top, "secret"), []byte("keep"), 0o644)
	if err := unix.Symlinkat(top, int(pd.Fd()), "escape"); err != nil {
		t.Fatal(err)
	}
	pd.Close()
	for _, p := range []string{parent + "/escape/secret", deep + strings.Repeat("/..", strings.Count(deep, "/")+2) + "/secret"} {
		if f, err := OpenBeneath(root, p, unix.O_RDONLY); err == nil {
			f.Close()
			t.Errorf("opened %.40q…%q beneath the root", p, p[len(p)-40:])
		} else if !errors.Is(err, unix.ELOOP) && !errors.Is(err, unix.EXDEV) && !errors.Is(err, unix.ENOTDIR) {
			t.Errorf("%.40q…%q: %v, want a refusal to leave the root", p, p[len(p)-40:], err)
		}
	}
}

// An entry whose path is too long for the wire is left out and counted,
// with what is under it; the rest of the tree is scanned.
func TestScanLeavesOutPathsPastMaxPath(t *testing.T) {
	dir := t.TempDir()
	deep := deepTree(t, dir, wire.MaxPath, nil)
	os.WriteFile(filepath.Join(dir, "z"), nil, 0o644)
	root, err := OpenRoot(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer root.Close()
	entries, tooLong, err := Scan(root, false)
	if err != nil {
		t.Fatalf("scanning a tree with a %d-byte path: %v", len(deep), err)
	}
	if tooLong != 1 {
		t.Fatalf("%d entries counted as too long, want 1 (the first past %d bytes)", tooLong, wire.MaxPath)
	}
	for _, e := range entries {
		if len(e.Path) > wire.MaxPath {
			t.Fatalf("entry of %d bytes listed", len(e.Path))
		}
	}
	if last := entries[len(entries)-1]; last.Path != "z" {
		t.Fatalf("last entry %.40q, want z (the rest of the tree)", last.Path)
	}
}

// OpenSameMount stops at a filesystem mounted inside the root, the mount
// point itself included; OpenBeneath crosses it.
func TestOpenSameMountStopsAtMountPoint(t *testing.T) {
	dir := t.TempDir()
	if err := os.MkdirAll(filepath.Join(dir, "d", "mnt"), 0o755); err != nil {
		t.Fatal(err)
	}
	loopfs.Tmpfs(t, filepath.Join(dir, "d", "mnt"))
	if err := os.WriteFile(filepath.Join(dir, "d", "mnt", "f"), []byte("x"), 0o644); err != nil {
		t.Fatal(err)
	}
	root, err := OpenRoot(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer root.Close()
	for _, p := range []string{"d/mnt", "d/mnt/f"} {
		if f, err := OpenSameMount(root, p, unix.O_PATH|unix.O_NOFOLLOW); !errors.Is(err, unix.EXDEV) {
			if err == nil {
				f.Close()
			}
			t.Errorf("OpenSameMount(%q): %v, want EXDEV", p, err)
		}
		f, err := OpenBeneath(root, p, unix.O_PATH|unix.O_NOFOLLOW)
		if err != nil {
			t.Errorf("OpenBeneath(%q): %v", p, err)
			continue
		}
		f.Close()
	}
	f, err := OpenSameMount(root, "d", unix.O_PATH|unix.O_DIRECTORY)
	if err != nil {
		t.Fatalf("OpenSameMount of the directory holding the mount point: %v", err)
	}
	f.Close()
}

// ComparePaths is the order of Scan: a tree of names that sort
// differently as whole paths ("a/b" and "a.c": '/' sorts after '.') scans
// in exactly the order ComparePaths gives.
func TestComparePathsIsScanOrder(t *testing.T) {
	dir := t.TempDir()
	for _, p := range []string{"a/b/c", "a/b.x", "a.c", "a-", "a/z", "b", "a0/q", "ab"} {
		os.MkdirAll(filepath.Join(dir, filepath.Dir(p)), 0o755)
		if err := os.WriteFile(filepath.Join(dir, p), nil, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	root, err := OpenRoot(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer root.Close()
	es, _, err := Scan(root, false)
	if err != nil {
		t.Fatal(err)
	}
	for i := range es {
		for j := range es {
			got := ComparePaths(es[i].Path, es[j].Path)
			want := 0
			switch {
			case i < j:
				want = -1
			case i > j:
				want = 1
			}
			if got != want {
				t.Errorf("ComparePaths(%q, %q) = %d, want %d (scan order)", es[i].Path, es[j].Path, got, want)
			}
		}
	}
}

// TestSumEntryReplacedByFIFO: a file replaced by a FIFO after it was
// listed is left unsummed, at once: opened for reading without
// O_NONBLOCK, the FIFO blocked the open until a writer came, for ever
// (a resync summing it never ended).
func TestSumEntryReplacedByFIFO(t *testing.T) {
	dir := t.TempDir()
	p := filepath.Join(dir, "f")
	if err := os.WriteFile(p, []byte("data"), 0o644); err != nil {
		t.Fatal(err)
	}
	var st unix.Stat_t
	if err := unix.Lstat(p, &st); err != nil {
		t.Fatal(err)
	}
	e := &wire.Entry{Path: "f", Mode: 0o644, Size: 4, Ino: st.Ino}
	os.Remove(p)
	if err := unix.Mkfifo(p, 0o644); err != nil {
		t.Fatal(err)
	}
	root, err := OpenRoot(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer root.Close()
	done := make(chan error, 1)
	go func() { done <- SumEntry(root, e) }()
	select {
	case err := <-done:
		if err != nil || e.Flags&wire.EntrySummed != 0 {
			t.Fatalf("SumEntry of a file replaced by a FIFO: %v, flags %#x; want no error and no sums", err, e.Flags)
		}
	case <-time.After(5 * time.Second):
		// Unblock the open so that the test can end.
		if w, err := os.OpenFile(p, os.O_WRONLY|unix.O_NONBLOCK, 0); err == nil {
			w.Close()
		}
		t.Fatal("SumEntry still blocked 5 s after it was called on a file replaced by a FIFO")
	}
}

// TestHandleIDs: the inode number and generation in each filesystem's
// file handle (the generation tells a reused inode number apart).
func TestHandleIDs(t *testing.T) {
	for _, tc := range []struct {
		typ  int32
		b    []byte
		ino  uint64
		want uint32
		ok   bool
	}{
		{1, []byte{0x0c, 0, 0, 0, 0x78, 0x56, 0x34, 0x12}, 12, 0x12345678, true},
		{2, []byte{0x0c, 0, 0, 0, 0x78, 0x56, 0x34, 0x12, 2, 0, 0, 0, 0, 0, 0, 0}, 12, 0x12345678, true},
		{0x81, []byte{0x83, 0, 0, 0, 0, 0, 0, 1, 0xe3, 0xfa, 0x20, 0x8e}, 1<<56 | 0x83, 0x8e20fae3, true},
		{0x82, []byte{0x83, 0, 0, 0, 0, 0, 0, 0, 0xe3, 0xfa, 0x20, 0x8e, 0x80, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0}, 0x83, 0x8e20fae3, true},
		{0x81, []byte{0x83, 0, 0, 0, 0, 0, 0, 0}, 0, 0, false}, // short
		{0x4d, []byte{1, 1, 0, 0, 0, 0, 0, 0, 5, 0, 0, 0, 0, 0, 0, 0, 0x0b, 0, 0, 0}, 0x101, 0x0b, true},
		{0x4e, []byte{1, 1, 0, 0, 0, 0, 0, 0, 5, 0, 0, 0, 0, 0, 0, 0, 0x0b, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 7, 0, 0, 0}, 0x101, 0x0b, true},
		{0x4d, make([]byte, 16), 0, 0, false}, // short
	} {
		ino, got, ok := HandleIDs(tc.typ, tc.b)
		if ino != tc.ino || got != tc.want || ok != tc.ok {
			t.Errorf("HandleIDs(%#x, % x) = %#x, %#x, %v; want %#x, %#x, %v", tc.typ, tc.b, ino, got, ok, tc.ino, tc.want, tc.ok)
		}
	}
}
