package capture

import (
	"io"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"unsafe"

	"github.com/duet-ha/duet/pkg/loopfs"
	"golang.org/x/sys/unix"
)

// filesystems are those capture is tested on, with the image size each
// needs (mkfs.xfs refuses less than 300 MiB).
var filesystems = []struct {
	fstype string
	mib    int
}{{"ext4", 64}, {"xfs", 320}, {"btrfs", 256}}

// openOn opens a capture of the fstype filesystem mounted on mount, as
// the daemon does: XFS and btrfs with their hooks.
func openOn(t testing.TB, fstype, mount string) *Capture {
	t.Helper()
	var st syscall.Stat_t
	if err := syscall.Stat(mount, &st); err != nil {
		t.Fatal(err)
	}
	opts := Options{Devices: []uint64{st.Dev}, XFS: fstype == "xfs"}
	if fstype == "btrfs" {
		sb, err := BtrfsSuperblock(mount)
		if err != nil {
			t.Fatal(err)
		}
		opts.Btrfs = []uint64{sb}
	}
	c, err := Open(opts)
	if err != nil {
		t.Fatalf("Open: %v", err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// onEachFS runs fn as a subtest for each filesystem.
func onEachFS(t *testing.T, fn func(t *testing.T, fstype string, mib int)) {
	for _, f := range filesystems {
		t.Run(f.fstype, func(t *testing.T) { fn(t, f.fstype, f.mib) })
	}
}

// forEachFS runs fn as a subtest on a fresh, captured filesystem of each
// kind.
func forEachFS(t *testing.T, fn func(t *testing.T, fs *loopfs.FS, c *Capture, rec *recorder)) {
	for _, f := range filesystems {
		t.Run(f.fstype, func(t *testing.T) {
			fs := loopfs.Make(t, f.fstype, f.mib)
			c := openOn(t, f.fstype, fs.Mount)
			fn(t, fs, c, newRecorder(c))
		})
	}
}

func inoOf(t *testing.T, path string) uint64 {
	t.Helper()
	var st syscall.Stat_t
	if err := syscall.Lstat(path, &st); err != nil {
		t.Fatal(err)
	}
	return st.Ino
}

// covers reports whether a record of kind k about ino covers [off, end).
func covers(recs []Record, ino uint64, k Kind, off, end uint64) bool {
	for _, r := range recs {
		if r.Ino == ino && r.Kind == k && r.Pos <= off && r.Pos+r.Len >= end {
			return true
		}
	}
	return false
}

func hasKind(recs []Record, ino uint64, k Kind) bool {
	for _, r := range recs {
		if r.Ino == ino && r.Kind == k {
			return true
		}
	}
	return false
}

// TestCaptureOps: every operation kind of docs/CAPTURE.md reports, on
// each filesystem, a record a reader needs: the bytes changed, the inode
// changed, the inode is new. A kind without its record is a change the
// secondary never gets.
func TestCaptureOps(t *testing.T) {
	forEachFS(t, func(t *testing.T, fs *loopfs.FS, c *Capture, rec *recorder) {
		dir := filepath.Join(fs.Mount, "d")
		p := filepath.Join(dir, "f")
		if err := os.Mkdir(dir, 0o755); err != nil {
			t.Fatal(err)
		}
		settle(t, c, rec)
		f, err := os.Create(p)
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		ino, dino := inoOf(t, p), inoOf(t, dir)
		recs := settle(t, c, rec)
		if !hasKind(recs, ino, KindNew) || !hasKind(recs, dino, KindAttr) {
			t.Errorf("create: new=%v dir attr=%v", hasKind(recs, ino, KindNew), hasKind(recs, dino, KindAttr))
		}

		buf := make([]byte, 1<<20)
		for i := range buf {
			buf[i] = byte(i)
		}
		if _, err := f.WriteAt(buf, 0); err != nil {
			t.Fatal(err)
		}
		if _, err := f.WriteAt([]byte("hello"), 3<<20+100); err != nil {
			t.Fatal(err)
		}
		recs = settle(t, c, rec)
		if !covers(recs, ino, KindData, 0, 1<<20) && !coveredAll(recs, ino, 0, 1<<20) {
			t.Errorf("buffered write of 1 MiB at 0 not covered")
		}
		if !covers(recs, ino, KindData, 3<<20+100, 3<<20+105) {
			t.Errorf("buffered write of 5 bytes at 3 MiB+100 not covered")
		}
		// The gap a write past EOF leaves reads as zeros on both sides:
		// reported, it would be read and shipped.
		for _, r := range recs {
			if r.Ino == ino && r.Pos <= 2<<20 && r.Pos+r.Len > 2<<20 {
				t.Errorf("the hole before a write past EOF reported: %+v", r)
			}
		}
		// A rewrite of bytes whose page is already dirty.
		if _, err := f.WriteAt([]byte("again"), 200); err != nil {
			t.Fatal(err)
		}
		if recs = settle(t, c, rec); !covers(recs, ino, KindData, 200, 205) {
			t.Errorf("rewrite of a dirty page not covered: %v", recs)
		}

		if err := f.Chmod(0o600); err != nil {
			t.Fatal(err)
		}
		if recs = settle(t, c, rec); !hasKind(recs, ino, KindAttr) {
			t.Errorf("chmod: no attr record")
		}

		if err := f.Truncate(1000); err != nil {
			t.Fatal(err)
		}
		if recs = settle(t, c, rec); !covers(recs, ino, KindData, 1000, 4<<20) || !hasKind(recs, ino, KindAttr) {
			t.Errorf("truncate down to 1000: tail data=%v attr=%v", covers(recs, ino, KindData, 1000, 4<<20), hasKind(recs, ino, KindAttr))
		}

		// fallocate: preop, then data once the syscall returned.
		if _, err := f.WriteAt(buf, 0); err != nil {
			t.Fatal(err)
		}
		settle(t, c, rec)
		if err := unix.Fallocate(int(f.Fd()), unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, 64<<10, 128<<10); err != nil {
			t.Fatal(err)
		}
		if recs = settle(t, c, rec); !covers(recs, ino, KindPreop, 64<<10, 192<<10) || !covers(recs, ino, KindData, 64<<10, 192<<10) {
			t.Errorf("punch hole: preop=%v data=%v", covers(recs, ino, KindPreop, 64<<10, 192<<10), covers(recs, ino, KindData, 64<<10, 192<<10))
		}
		// btrfs has no collapse or insert range.
		btrfs := fsMagic(t, fs.Mount) == unix.BTRFS_SUPER_MAGIC
		if err := unix.Fallocate(int(f.Fd()), unix.FALLOC_FL_COLLAPSE_RANGE, 256<<10, 64<<10); btrfs && err == unix.EOPNOTSUPP {
			t.Logf("collapse range: not supported by btrfs (%v)", err)
		} else if err != nil {
			t.Fatal(err)
		} else if recs = settle(t, c, rec); !covers(recs, ino, KindData, 256<<10, 1<<40) {
			t.Errorf("collapse range: no data record to the end of file: %v", recs)
		}
		if err := unix.Fallocate(int(f.Fd()), unix.FALLOC_FL_ZERO_RANGE, 300<<10, 10000); err != nil {
			t.Fatal(err)
		}
		if recs = settle(t, c, rec); !covers(recs, ino, KindData, 300<<10, 300<<10+10000) {
			t.Errorf("zero range: not covered by a data record: %v", recs)
		}
		if err := unix.Fallocate(int(f.Fd()), unix.FALLOC_FL_INSERT_RANGE, 64<<10, 64<<10); btrfs && err == unix.EOPNOTSUPP {
			t.Logf("insert range: not supported by btrfs (%v)", err)
		} else if err != nil {
			t.Fatal(err)
		} else if recs = settle(t, c, rec); !covers(recs, ino, KindData, 64<<10, 1<<40) {
			t.Errorf("insert range: no data record to the end of file: %v", recs)
		}
		af, err := os.OpenFile(p, os.O_WRONLY|os.O_APPEND, 0)
		if err != nil {
			t.Fatal(err)
		}
		size, _ := af.Seek(0, io.SeekEnd)
		if _, err := af.Write([]byte("tail")); err != nil {
			t.Fatal(err)
		}
		af.Close()
		if recs = settle(t, c, rec); !covers(recs, ino, KindData, uint64(size), uint64(size)+4) {
			t.Errorf("O_APPEND write at %d not covered: %v", size, recs)
		}

		// O_DIRECT.
		df, err := os.OpenFile(p, os.O_WRONLY|syscall.O_DIRECT, 0)
		if err != nil {
			t.Fatal(err)
		}
		aligned := alignedBuf(t, 64<<10)
		if _, err := df.WriteAt(aligned, 128<<10); err != nil {
			t.Fatal(err)
		}
		df.Close()
		if recs = settle(t, c, rec); !covers(recs, ino, KindData, 128<<10, 192<<10) {
			t.Errorf("O_DIRECT write not covered: %v", recs)
		}

		// A store through a shared mapping.
		if err := f.Sync(); err != nil {
			t.Fatal(err)
		}
		m, err := unix.Mmap(int(f.Fd()), 0, 1<<20, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
		if err != nil {
			t.Fatal(err)
		}
		settle(t, c, rec)
		m[500<<10] = 7
		unix.Munmap(m)
		if recs = settle(t, c, rec); !covers(recs, ino, KindMmap, 500<<10, 500<<10+1) {
			t.Errorf("store through a mapping not reported: %v", recs)
		}

		// Directory entries: rename, link, unlink.
		q := filepath.Join(dir, "g")
		if err := os.Rename(p, q); err != nil {
			t.Fatal(err)
		}
		if recs = settle(t, c, rec); !hasKind(recs, dino, KindAttr) {
			t.Errorf("rename: no attr record of the directory")
		}
		if err := os.Remove(q); err != nil {
			t.Fatal(err)
		}
		if recs = settle(t, c, rec); !hasKind(recs, dino, KindAttr) {
			t.Errorf("unlink: no attr record of the directory")
		}
		t.Logf("records by hook: %v", rec.byHook)
	})
}

// coveredAll reports whether data records of ino together cover [off, end).
func coveredAll(recs []Record, ino, off, end uint64) bool {
	seen := make([]bool, end-off)
	for _, r := range recs {
		if r.Ino != ino || r.Kind != KindData {
			continue
		}
		for b := max(r.Pos, off); b < min(r.Pos+r.Len, end); b++ {
			seen[b-off] = true
		}
	}
	for _, ok := range seen {
		if !ok {
			return false
		}
	}
	return true
}

// settle returns the records read until none came for 300 ms and drops
// their marks, as the reader does before reading, so that the next change
// of the same inode or chunk reports again.
func settle(t *testing.T, c *Capture, rec *recorder) []Record {
	t.Helper()
	recs := rec.drain()
	for _, r := range recs {
		switch r.Kind {
		case KindAttr:
			c.ForgetAttr(InodeKey{Dev: r.Dev, Ino: r.Ino})
		case KindData, KindMmap:
			var keys []CaptureChunkKey
			// The chunks of the record, the first 1,024 of a longer one
			// (to the end of the file): not only those below 1 GiB,
			// or a write far into a file left its mark, which then
			// hid the next change of its chunk from the test.
			first := r.Pos >> ChunkShift
			for ch := first; ch <= (r.Pos+r.Len-1)>>ChunkShift && ch < first+1<<10; ch++ {
				keys = append(keys, CaptureChunkKey{Dev: r.Dev, Ino: r.Ino, Chunk: ch})
			}
			if err := c.ForgetChunks(keys); err != nil {
				t.Fatal(err)
			}
		}
	}
	return recs
}

// TestCaptureFallocateOutsideSyscall: a punch hole through io_uring runs
// in an io-wq worker, which is in no fallocate(2): XFS names only the
// inode, so the whole file is reported before the change, to be read
// after the inode update that follows (ext4 names the range).
func TestCaptureFallocateOutsideSyscall(t *testing.T) {
	forEachFS(t, func(t *testing.T, fs *loopfs.FS, c *Capture, rec *recorder) {
		r := newRing(t)
		f, err := os.Create(filepath.Join(fs.Mount, "f"))
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		if _, err := f.WriteAt(make([]byte, 1<<20), 0); err != nil {
			t.Fatal(err)
		}
		ino := inoOf(t, f.Name())
		settle(t, c, rec)
		if _, err := r.submit(ioringOpFallocate, int(f.Fd()), 64<<10, 128<<10,
			unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE); err != nil {
			t.Fatalf("io_uring fallocate: %v", err)
		}
		recs := settle(t, c, rec)
		var preop, attrAfter bool
		var preopSeq uint64
		for _, r := range recs {
			if r.Ino == ino && r.Kind == KindPreop && r.Pos <= 64<<10 && r.Pos+r.Len >= 192<<10 {
				preop, preopSeq = true, r.Seq
			}
		}
		for _, r := range recs {
			if r.Ino == ino && r.Kind == KindAttr && preop && r.Seq > preopSeq {
				attrAfter = true
			}
		}
		if !preop || !attrAfter {
			t.Fatalf("punch hole through io_uring: preop covering the range %v, attr after it %v: %v", preop, attrAfter, recs)
		}
	})
}

// alignedBuf returns n bytes aligned for O_DIRECT (an anonymous mapping).
func alignedBuf(t *testing.T, n int) []byte {
	b, err := unix.Mmap(-1, 0, n, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Munmap(b) })
	return b
}

// xfsIocExchangeRange is XFS_IOC_EXCHANGE_RANGE: _IOW('X', 129, struct
// xfs_exchange_range), 40 bytes.
const xfsIocExchangeRange = 0x40285881

type xfsExchangeRange struct {
	File1FD     int32
	Pad         uint32
	File1Offset uint64
	File2Offset uint64
	Length      uint64
	Flags       uint64
}

// TestCaptureSharedExtents: copy_file_range, reflinks (FICLONERANGE,
// FICLONE) and an XFS range exchange change a file's bytes without
// writing them; each changed range must be reported as data once the call
// returned. On ext4 copy_file_range copies through the page cache and
// there are no reflinks; range exchange is XFS only.
func TestCaptureSharedExtents(t *testing.T) {
	forEachFS(t, func(t *testing.T, fs *loopfs.FS, c *Capture, rec *recorder) {
		src, err := os.Create(filepath.Join(fs.Mount, "src"))
		if err != nil {
			t.Fatal(err)
		}
		defer src.Close()
		dst, err := os.Create(filepath.Join(fs.Mount, "dst"))
		if err != nil {
			t.Fatal(err)
		}
		defer dst.Close()
		buf := make([]byte, 1<<20)
		for i := range buf {
			buf[i] = byte(i * 7)
		}
		for _, f := range []*os.File{src, dst} {
			if _, err := f.WriteAt(buf, 0); err != nil {
				t.Fatal(err)
			}
			if err := f.Sync(); err != nil {
				t.Fatal(err)
			}
		}
		sino, dino := inoOf(t, src.Name()), inoOf(t, dst.Name())
		settle(t, c, rec)

		off := int64(0)
		doff := int64(256 << 10)
		if _, err := unix.CopyFileRange(int(src.Fd()), &off, int(dst.Fd()), &doff, 64<<10, 0); err != nil {
			t.Fatal(err)
		}
		recs := settle(t, c, rec)
		if !covers(recs, dino, KindData, 256<<10, 320<<10) {
			t.Errorf("copy_file_range: the destination range is covered by no data record: %v", recs)
		}
		magic := fsMagic(t, fs.Mount)
		if magic == unix.EXT4_SUPER_MAGIC {
			return
		}
		err = unix.IoctlFileCloneRange(int(dst.Fd()), &unix.FileCloneRange{
			Src_fd: int64(src.Fd()), Src_offset: 0, Src_length: 128 << 10, Dest_offset: 512 << 10})
		if err != nil {
			t.Fatalf("FICLONERANGE: %v", err)
		}
		if recs = settle(t, c, rec); !covers(recs, dino, KindData, 512<<10, 640<<10) {
			t.Errorf("FICLONERANGE: the destination range is covered by no data record: %v", recs)
		}
		// FICLONE of the whole source over a file with other bytes.
		if err := unix.IoctlFileClone(int(dst.Fd()), int(src.Fd())); err != nil {
			t.Fatalf("FICLONE: %v", err)
		}
		if recs = settle(t, c, rec); !covers(recs, dino, KindData, 0, 1<<20) {
			t.Errorf("FICLONE: the destination is covered by no data record: %v", recs)
		}
		if magic != unix.XFS_SUPER_MAGIC {
			t.Logf("records by hook: %v", rec.byHook)
			return
		}
		x := xfsExchangeRange{File1FD: int32(src.Fd()), File1Offset: 0, File2Offset: 768 << 10, Length: 64 << 10}
		_, _, errno := unix.Syscall(unix.SYS_IOCTL, dst.Fd(), xfsIocExchangeRange, uintptr(unsafe.Pointer(&x)))
		if errno == unix.EOPNOTSUPP {
			// mkfs.xfs before 6.10 cannot make a filesystem with it.
			t.Logf("XFS_IOC_EXCHANGE_RANGE not exercised: this filesystem has no exchange-range feature (mkfs.xfs -i exchange=1)")
			return
		}
		if errno != 0 {
			t.Fatalf("XFS_IOC_EXCHANGE_RANGE: %v", errno)
		}
		recs = settle(t, c, rec)
		if !covers(recs, dino, KindData, 768<<10, 832<<10) || !covers(recs, sino, KindData, 0, 64<<10) {
			t.Errorf("exchange range: dst covered=%v src covered=%v: %v", covers(recs, dino, KindData, 768<<10, 832<<10), covers(recs, sino, KindData, 0, 64<<10), recs)
		}
		t.Logf("records by hook: %v", rec.byHook)
	})
}

// fsMagic is the type of the filesystem path is on.
func fsMagic(t *testing.T, path string) int64 {
	var st unix.Statfs_t
	if err := unix.Statfs(path, &st); err != nil {
		t.Fatal(err)
	}
	return st.Type
}

// TestLoadWithoutXFSOrBtrfs: a node that watches neither XFS nor btrfs
// loads no program naming their types (where either is a module not
// loaded they would fail the whole load, ext4 capture included) and
// attaches none of their hooks.
func TestLoadWithoutXFSOrBtrfs(t *testing.T) {
	loopfs.RequireRoot(t)
	spec, err := LoadCapture()
	if err != nil {
		t.Fatal(err)
	}
	withoutPrefix(spec, "xfs_")
	withoutPrefix(spec, "btrfs_")
	for name, p := range spec.Programs {
		if strings.HasPrefix(p.AttachTo, "xfs_") || strings.HasPrefix(p.AttachTo, "btrfs_") {
			t.Errorf("program %s still attaches to %s", name, p.AttachTo)
		}
	}
	c, err := Open(Options{})
	if err != nil {
		t.Fatalf("Open without XFS or btrfs: %v", err)
	}
	defer c.Close()
	for _, h := range c.Hooks() {
		switch {
		case strings.HasPrefix(h.Name, "xfs_"), strings.HasPrefix(h.Name, "btrfs_"),
			strings.Contains(h.Name, "ctime"), strings.HasPrefix(h.Name, "io_uring_"),
			h.Name == "iomap_iter", h.Name == "syscalls/sys_exit_ioctl", h.Name == "syscalls/sys_enter_ioctl",
			h.Name == "syscalls/sys_exit_rename":
			t.Errorf("hook %s attached with neither XFS nor btrfs watched", h.Name)
		}
	}
}
