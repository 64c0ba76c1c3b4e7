package capture

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/duet-ha/duet/pkg/loopfs"
)

// The preallocation ioctls' numbers (vfs_fallocate through
// ioctl_preallocate) and their argument, struct space_resv.
const (
	fsIocUnresvsp64 = 0x4030582b // _IOW('X', 43, struct space_resv)
	fsIocZeroRange  = 0x40305839 // _IOW('X', 57, struct space_resv)
)

type spaceResv struct {
	typ, whence int16
	_           int32
	start, len  int64
	_           [6]int32
}

// TestCaptureRangeOpsBeyondFallocate: a punch or zero-range reaches the
// filesystem through other doors than fallocate(2), io_uring and the
// reflink calls: madvise(MADV_REMOVE) on a shared mapping, the
// preallocation ioctls, and a loop device's discard of an image file in
// the tree (run by a kernel worker). Each must report its range. On
// btrfs, whose range operations were reported by their syscalls, none
// was: only the inode update came, and the peer kept the old bytes (found
// by a fresh-context review, fortieth session).
func TestCaptureRangeOpsBeyondFallocate(t *testing.T) {
	forEachFS(t, func(t *testing.T, fs *loopfs.FS, c *Capture, rec *recorder) {
		const size = 1 << 20
		fill := func(t *testing.T, name string) (*os.File, uint64) {
			t.Helper()
			f, err := os.OpenFile(filepath.Join(fs.Mount, name), os.O_RDWR|os.O_CREATE, 0o644)
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { f.Close() })
			buf := make([]byte, size)
			for i := range buf {
				buf[i] = byte(i%251) + 1
			}
			if _, err := f.WriteAt(buf, 0); err != nil {
				t.Fatal(err)
			}
			if err := f.Sync(); err != nil {
				t.Fatal(err)
			}
			settle(t, c, rec)
			return f, inoOf(t, f.Name())
		}
		// reported: a data record covers [off, end), or a preop whose
		// range the next inode update releases.
		reported := func(t *testing.T, what string, ino, off, end uint64) {
			t.Helper()
			recs := settle(t, c, rec)
			if !coveredAll(recs, ino, off, end) && !covers(recs, ino, KindPreop, off, end) {
				t.Errorf("%s of [%d, %d): not reported; records: %v", what, off, end, recs)
			}
		}
		t.Run("madvise-remove", func(t *testing.T) {
			f, ino := fill(t, "madv")
			m, err := unix.Mmap(int(f.Fd()), 0, size, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
			if err != nil {
				t.Fatal(err)
			}
			defer unix.Munmap(m)
			if err := unix.Madvise(m[64<<10:192<<10], unix.MADV_REMOVE); err != nil {
				t.Fatalf("madvise(MADV_REMOVE): %v", err)
			}
			reported(t, "MADV_REMOVE", ino, 64<<10, 192<<10)
		})
		for _, io := range []struct {
			name string
			cmd  uintptr
		}{{"unresvsp64", fsIocUnresvsp64}, {"zero-range-ioctl", fsIocZeroRange}} {
			t.Run(io.name, func(t *testing.T) {
				f, ino := fill(t, io.name)
				r := spaceResv{start: 256 << 10, len: 64 << 10}
				if _, _, e := unix.Syscall(unix.SYS_IOCTL, f.Fd(), io.cmd, uintptr(unsafe.Pointer(&r))); e != 0 {
					if e == unix.EOPNOTSUPP || e == unix.ENOTTY {
						t.Skipf("%s: not supported here (%v)", io.name, e)
					}
					t.Fatalf("ioctl %s: %v", io.name, e)
				}
				reported(t, io.name, ino, 256<<10, 320<<10)
			})
		}
		t.Run("loop-discard", func(t *testing.T) {
			for _, tool := range []string{"losetup", "blkdiscard"} {
				if _, err := exec.LookPath(tool); err != nil {
					t.Skipf("%s not installed: %v", tool, err)
				}
			}
			f, ino := fill(t, "image")
			out, err := exec.Command("losetup", "--find", "--show", f.Name()).CombinedOutput()
			if err != nil {
				t.Skipf("no loop device for an image in the tree: %v: %s", err, out)
			}
			dev := strings.TrimSpace(string(out))
			defer exec.Command("losetup", "-d", dev).Run()
			if out, err := exec.Command("blkdiscard", "-o", fmt.Sprint(512<<10), "-l", fmt.Sprint(128<<10), dev).CombinedOutput(); err != nil {
				t.Fatalf("blkdiscard: %v: %s", err, out)
			}
			reported(t, "a loop device's discard", ino, 512<<10, 640<<10)
		})
		t.Run("overlay-punch", func(t *testing.T) {
			// The file's inode in the syscall is the overlay's.
			merged := overlayOver(t, fs.Mount)
			f, err := os.OpenFile(filepath.Join(merged, "f"), os.O_RDWR|os.O_CREATE, 0o644)
			if err != nil {
				t.Fatal(err)
			}
			defer f.Close()
			if _, err := f.WriteAt(make([]byte, size), 0); err != nil {
				t.Fatal(err)
			}
			f.Sync()
			ino := inoOf(t, filepath.Join(fs.Mount, "upper", "f"))
			settle(t, c, rec)
			if err := unix.Fallocate(int(f.Fd()), unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, 64<<10, 64<<10); err != nil {
				t.Fatal(err)
			}
			reported(t, "a punch through overlayfs", ino, 64<<10, 128<<10)
		})
		if fsMagic(t, fs.Mount) != unix.BTRFS_SUPER_MAGIC {
			return
		}
		// The syscalls whose own hooks report their range: the range
		// lock's report (hook 34) stays out of them, or each would be
		// reported twice, a preallocation's bytes and a clone's source
		// sent again.
		t.Run("syscalls-own-hooks", func(t *testing.T) {
			f, _ := fill(t, "src")
			g, _ := fill(t, "dst")
			before := rec.byHook[34]
			if err := unix.Fallocate(int(f.Fd()), unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, 64<<10, 64<<10); err != nil {
				t.Fatal(err)
			}
			if err := unix.Fallocate(int(f.Fd()), unix.FALLOC_FL_KEEP_SIZE, 0, 2*size); err != nil {
				t.Fatal(err)
			}
			if err := unix.IoctlFileClone(int(g.Fd()), int(f.Fd())); err != nil {
				t.Fatal(err)
			}
			if err := unix.IoctlFileCloneRange(int(g.Fd()), &unix.FileCloneRange{Src_fd: int64(f.Fd()), Src_offset: 0, Src_length: 128 << 10, Dest_offset: 256 << 10}); err != nil {
				t.Fatal(err)
			}
			if _, err := unix.CopyFileRange(int(f.Fd()), nil, int(g.Fd()), nil, 64<<10, 0); err != nil {
				t.Fatal(err)
			}
			// Nor writes, nor their fsync, which writes back under the
			// same locks.
			if _, err := g.WriteAt(make([]byte, size), 0); err != nil {
				t.Fatal(err)
			}
			if err := g.Sync(); err != nil {
				t.Fatal(err)
			}
			if _, err := g.WriteAt(make([]byte, 4096), 8192); err != nil {
				t.Fatal(err)
			}
			if err := unix.Fdatasync(int(g.Fd())); err != nil {
				t.Fatal(err)
			}
			settle(t, c, rec)
			if n := rec.byHook[34] - before; n != 0 {
				t.Errorf("%d records of the range lock's hook for calls their own hooks report", n)
			}
		})
	})
}

// overlayOver mounts an overlay whose upper layer is upper/ in the
// captured tree (work/ its work directory), and returns where.
func overlayOver(t *testing.T, tree string) string {
	t.Helper()
	for _, d := range []string{"upper", "work"} {
		if err := os.MkdirAll(filepath.Join(tree, d), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	lower, merged := t.TempDir(), t.TempDir()
	opts := "lowerdir=" + lower + ",upperdir=" + filepath.Join(tree, "upper") + ",workdir=" + filepath.Join(tree, "work")
	if err := unix.Mount("overlay", merged, "overlay", 0, opts); err != nil {
		t.Skipf("overlayfs over %s: %v", tree, err)
	}
	t.Cleanup(func() { unix.Unmount(merged, unix.MNT_DETACH) })
	return merged
}

// TestCaptureSharedMappingThroughOverlay: a shared writable mapping made
// through an overlay whose upper layer is in the tree maps the file
// beneath, and is reported whole as one made directly is: a store into a
// page a write had dirtied fires no writeback_dirty_folio, and only that
// report has the page read again. The programs looked at the overlay's
// inode, not watched: nothing was reported (found by a fresh-context
// review, fortieth session).
func TestCaptureSharedMappingThroughOverlay(t *testing.T) {
	forEachFS(t, func(t *testing.T, fs *loopfs.FS, c *Capture, rec *recorder) {
		merged := overlayOver(t, fs.Mount)
		f, err := os.OpenFile(filepath.Join(merged, "f"), os.O_RDWR|os.O_CREATE, 0o644)
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		if _, err := f.WriteAt(make([]byte, 256<<10), 0); err != nil {
			t.Fatal(err)
		}
		ino := inoOf(t, filepath.Join(fs.Mount, "upper", "f"))
		settle(t, c, rec)
		// A write dirties the page; the store through the mapping then
		// dirties nothing new.
		if _, err := f.WriteAt([]byte("written"), 8192); err != nil {
			t.Fatal(err)
		}
		m, err := unix.Mmap(int(f.Fd()), 0, 256<<10, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
		if err != nil {
			t.Fatal(err)
		}
		defer unix.Munmap(m)
		copy(m[8192:], "stored!")
		recs := settle(t, c, rec)
		if !covers(recs, ino, KindMmap, 0, 256<<10) {
			t.Errorf("a shared mapping through overlayfs: no whole-file mmap record of the file beneath; records: %v", recs)
		}
		// A private or read-only one is not reported.
		p, err := unix.Mmap(int(f.Fd()), 0, 4096, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE)
		if err != nil {
			t.Fatal(err)
		}
		unix.Munmap(p)
		if recs := settle(t, c, rec); hasKind(recs, ino, KindMmap) {
			t.Errorf("a private mapping through overlayfs reported: %v", recs)
		}
	})
}
