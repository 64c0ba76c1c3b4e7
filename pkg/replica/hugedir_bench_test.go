package replica

import (
	"fmt"
	"log/slog"
	"math"
	"os"
	"path/filepath"
	"testing"

	"github.com/duet-ha/duet/pkg/capture"
	"github.com/duet-ha/duet/pkg/fstree"
	"github.com/duet-ha/duet/pkg/journal"
	"github.com/duet-ha/duet/pkg/wire"
	"golang.org/x/sys/unix"
)

// hugeDirSizes are the directory sizes the huge-directory benchmarks
// compare: a create must not cost in proportion to them (issue 18: 687 ms
// a create in the lab at 100,000 entries, 12 ms at 2,000).
var hugeDirSizes = []int{1000, 10000, 100000}

// makeHugeDir makes dir/huge holding n empty files.
func makeHugeDir(b *testing.B, dir string, n int) {
	b.Helper()
	huge := filepath.Join(dir, "huge")
	if err := os.MkdirAll(huge, 0o755); err != nil {
		b.Fatal(err)
	}
	for i := range n {
		fd, err := unix.Open(filepath.Join(huge, fmt.Sprintf("old%07d", i)), unix.O_CREAT|unix.O_WRONLY|unix.O_CLOEXEC, 0o644)
		if err != nil {
			b.Fatal(err)
		}
		unix.Close(fd)
	}
}

// BenchmarkHugeDirCreate is the primary's pass for one 1 KiB file created
// in a directory of N entries, fed the records capture reports for it:
// the directory's inode update, and the new inode's allocation, update
// and data. Each iteration creates one file (untimed) and builds its pass
// into a sink that drops the ops. read=names is the pass as it runs (the
// directory is big: the new inode is looked up where it is); read=whole
// reads the directory whole, as a pass does when an inode cannot be
// placed, and as every pass did before.
func BenchmarkHugeDirCreate(b *testing.B) {
	for _, whole := range []bool{false, true} {
		for _, n := range hugeDirSizes {
			read := "names"
			if whole {
				read = "whole"
			}
			b.Run(fmt.Sprintf("read=%s/entries=%d", read, n), func(b *testing.B) { benchHugeDirCreate(b, n, whole) })
		}
	}
}

func benchHugeDirCreate(b *testing.B, n int, whole bool) {
	src := filepath.Join(b.TempDir(), "src")
	makeHugeDir(b, src, n)
	root, local := scanSource(b, src)
	sh := newShadow(local)
	if whole {
		sh.big = map[uint64]bool{}
		sh.bigAt = math.MaxInt
	}
	bld := newBuilder(root, 0, sh, nil, sinkFunc(func(*wire.Op) error { return nil }), slog.New(slog.DiscardHandler), nil)
	huge := filepath.Join(src, "huge")
	var dirSt unix.Stat_t
	if err := unix.Stat(huge, &dirSt); err != nil {
		b.Fatal(err)
	}
	d, err := os.Open(huge)
	if err != nil {
		b.Fatal(err)
	}
	defer d.Close()
	data := make([]byte, 1024)
	seq := uint64(1)
	b.ResetTimer()
	for i := range b.N {
		b.StopTimer()
		name := fmt.Sprintf("new%07d", i)
		if err := os.WriteFile(filepath.Join(huge, name), data, 0o644); err != nil {
			b.Fatal(err)
		}
		var st unix.Stat_t
		if err := unix.Fstatat(int(d.Fd()), name, &st, 0); err != nil {
			b.Fatal(err)
		}
		_, gen, _ := fstree.Generation(int(d.Fd()), name)
		seq++
		nf := journal.File{Key: capture.InodeKey{Ino: st.Ino}, Attr: true, NewSeq: seq, NewGen: gen, Gen: gen, HasGen: true, MaxSeq: seq}
		nf.Data.Add(0, uint64(len(data)))
		files := []journal.File{{Key: capture.InodeKey{Ino: dirSt.Ino}, Attr: true, MaxSeq: seq}, nf}
		b.StartTimer()
		if _, err := bld.build(files); err != nil {
			b.Fatal(err)
		}
	}
	b.StopTimer()
	if _, ok := sh.child(uint64(dirSt.Ino), fmt.Sprintf("new%07d", b.N-1)); !ok {
		b.Fatal("the last file created is not in the shadow: the pass did not ship it")
	}
	if sh.big[dirSt.Ino] == whole {
		b.Fatalf("huge big %v with read=whole %v", sh.big[dirSt.Ino], whole)
	}
}

// BenchmarkHugeDirApply is the secondary's side: the ops of one 1 KiB
// file created in a directory of N entries (create, size, data, times),
// then the flush a barrier asks for.
func BenchmarkHugeDirApply(b *testing.B) {
	for _, n := range hugeDirSizes {
		b.Run(fmt.Sprintf("entries=%d", n), func(b *testing.B) {
			dst := filepath.Join(b.TempDir(), "dst")
			makeHugeDir(b, dst, n)
			a, err := NewApplier(dst)
			if err != nil {
				b.Fatal(err)
			}
			defer a.Close()
			if err := a.Sync(); err != nil { // the first one is a syncfs
				b.Fatal(err)
			}
			data := make([]byte, 1024)
			b.ResetTimer()
			for i := range b.N {
				p := fmt.Sprintf("huge/new%07d", i)
				for _, op := range []wire.Op{
					{Code: wire.OpCreate, Path: p, Mode: 0o644},
					{Code: wire.OpTruncate, Path: p, Off: uint64(len(data))},
					{Code: wire.OpWrite, Path: p, Data: data},
					{Code: wire.OpSetattr, Path: p, Mode: 0o644, UID: uint32(os.Getuid()), GID: uint32(os.Getgid()), Mtime: 1, Atime: 1},
				} {
					if err := a.Apply(&op); err != nil {
						b.Fatal(err)
					}
				}
				if err := a.Sync(); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

// BenchmarkRemovedTreeAside is the pass that removes the aside of a
// removed directory of N files (`rm -r d`, read gone by the pass before):
// it looks each inode the aside holds up by file handle first
// (heldInside), which fails at once for a removed one. Each iteration
// makes the tree, syncs it, removes it and builds the pass that keeps it
// aside (untimed), then times the next pass; ops go to a sink that drops
// them.
func BenchmarkRemovedTreeAside(b *testing.B) {
	for _, n := range []int{1000, 10000} {
		b.Run(fmt.Sprintf("files=%d", n), func(b *testing.B) {
			for range b.N {
				b.StopTimer()
				src := filepath.Join(b.TempDir(), "src")
				for i := range n {
					p := filepath.Join(src, "d", fmt.Sprintf("s%d", i/100), fmt.Sprintf("f%d", i))
					os.MkdirAll(filepath.Dir(p), 0o755)
					if err := os.WriteFile(p, nil, 0o644); err != nil {
						b.Fatal(err)
					}
				}
				root, local := scanSource(b, src)
				bld := newBuilder(root, 0, newShadow(local), nil, sinkFunc(func(*wire.Op) error { return nil }), slog.New(slog.DiscardHandler), nil)
				if err := os.RemoveAll(filepath.Join(src, "d")); err != nil {
					b.Fatal(err)
				}
				var st unix.Stat_t
				if err := unix.Stat(src, &st); err != nil {
					b.Fatal(err)
				}
				if _, err := bld.build([]journal.File{{Key: capture.InodeKey{Ino: st.Ino}, Attr: true}}); err != nil {
					b.Fatal(err)
				}
				if len(bld.asides) != 1 {
					b.Fatalf("asides %v, want d's", bld.asides)
				}
				b.StartTimer()
				if _, err := bld.build(nil); err != nil {
					b.Fatal(err)
				}
				b.StopTimer()
				if len(bld.asides) != 0 {
					b.Fatalf("asides left %v", bld.asides)
				}
				b.StartTimer()
			}
		})
	}
}
