package capture

import (
	"bytes"
	"os"
	"path/filepath"
	"runtime"
	"sync"
	"sync/atomic"
	"testing"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/duet-ha/duet/pkg/loopfs"
)

// From a fresh-context review of the range-lock hook (forty-first
// session): each test failed on cd02e3f, and says why.

func filledFile(t *testing.T, path string, size int, b byte) *os.File {
	t.Helper()
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o644)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	if size > 0 {
		if _, err := f.WriteAt(bytes.Repeat([]byte{b}, size), 0); err != nil {
			t.Fatal(err)
		}
	}
	if err := f.Sync(); err != nil {
		t.Fatal(err)
	}
	return f
}

// TestCaptureOverlayCloneGrowingDestination: a clone or copy_file_range
// made through overlayfs is reported only by the range lock (hook 34),
// which fires before btrfs_clone moves the destination's size and keeps
// only the part below the old size. A clone into a new file (cp
// --reflink, cp's default copy_file_range in a container) or one that
// appends reports nothing of the new bytes: the size comes as an inode
// update, the peer's copy is extended with zeros. The docs say range
// operations through overlayfs, and an in-kernel server's clone, are
// reported since this change.
func TestCaptureOverlayCloneGrowingDestination(t *testing.T) {
	forEachFS(t, func(t *testing.T, fs *loopfs.FS, c *Capture, rec *recorder) {
		if fsMagic(t, fs.Mount) == unix.EXT4_SUPER_MAGIC {
			t.Skip("ext4 copies through the page cache")
		}
		const size = 1 << 20
		merged := overlayOver(t, fs.Mount)
		src := filledFile(t, filepath.Join(merged, "src"), size, 'S')
		check := func(t *testing.T, name string, off, end uint64) {
			t.Helper()
			ino := inoOf(t, filepath.Join(fs.Mount, "upper", name))
			recs := settle(t, c, rec)
			if !coveredAll(recs, ino, off, end) && !covers(recs, ino, KindPreop, off, end) {
				t.Errorf("%s: [%d, %d) of the destination not reported; records: %v", name, off, end, recs)
			}
		}
		t.Run("ficlone-new-file", func(t *testing.T) {
			dst := filledFile(t, filepath.Join(merged, "clone"), 0, 0)
			settle(t, c, rec)
			if err := unix.IoctlFileClone(int(dst.Fd()), int(src.Fd())); err != nil {
				t.Fatal(err)
			}
			check(t, "clone", 0, size)
		})
		t.Run("copy-file-range-new-file", func(t *testing.T) {
			dst := filledFile(t, filepath.Join(merged, "copy"), 0, 0)
			settle(t, c, rec)
			if n, err := unix.CopyFileRange(int(src.Fd()), new(int64), int(dst.Fd()), new(int64), size, 0); err != nil || n != size {
				t.Fatalf("copy_file_range: %d, %v", n, err)
			}
			check(t, "copy", 0, size)
		})
		t.Run("ficlonerange-append", func(t *testing.T) {
			dst := filledFile(t, filepath.Join(merged, "append"), 256<<10, 'D')
			settle(t, c, rec)
			r := unix.FileCloneRange{Src_fd: int64(src.Fd()), Src_offset: 0, Src_length: 512 << 10, Dest_offset: 128 << 10}
			if err := unix.IoctlFileCloneRange(int(dst.Fd()), &r); err != nil {
				t.Fatal(err)
			}
			check(t, "append", 128<<10, 640<<10)
		})
	})
}

// TestCaptureRangeLockNotARecordAPage: besides the operation's own
// range lock, hook 34 fires for every LOCKED range the task sets while it
// holds i_mmap_lock, and btrfs_invalidate_folio locks each cached folio it
// drops (truncate_pagecache_range before a punch's lock,
// truncate_inode_pages_range after a clone): one record a cached 4 KiB
// page, none coalesced (emit, no mark). A clone through overlayfs over a
// cached 32 MiB file, or MADV_REMOVE of a cached 32 MiB range, makes
// ~8,200 records. (These per-page records after the clone are also what
// keeps a reader that read the range at the first record, before the
// clone, from keeping the old cached bytes: the lock-time record is a
// KindData taken while the destination's old pages are still cached.)
func TestCaptureRangeLockNotARecordAPage(t *testing.T) {
	loopfs.RequireRoot(t)
	fs := loopfs.Make(t, "btrfs", 256)
	c := openOn(t, "btrfs", fs.Mount)
	rec := newRecorder(c)
	merged := overlayOver(t, fs.Mount)
	const size = 32 << 20
	count := func(ino uint64) (n int) {
		for _, r := range settle(t, c, rec) {
			if r.Ino == ino && r.Hook == 34 {
				n++
			}
		}
		return n
	}
	t.Run("overlay-clone", func(t *testing.T) {
		src := filledFile(t, filepath.Join(merged, "src"), size, 'S')
		dst := filledFile(t, filepath.Join(merged, "dst"), size, 'D')
		upper := filepath.Join(fs.Mount, "upper", "dst")
		if _, err := os.ReadFile(upper); err != nil { // cached
			t.Fatal(err)
		}
		ino := inoOf(t, upper)
		settle(t, c, rec)
		if err := unix.IoctlFileClone(int(dst.Fd()), int(src.Fd())); err != nil {
			t.Fatal(err)
		}
		if n := count(ino); n > 64 {
			t.Errorf("one clone through overlayfs of a cached %d MiB file: %d records of hook 34", size>>20, n)
		}
	})
	t.Run("madvise-remove", func(t *testing.T) {
		f := filledFile(t, filepath.Join(fs.Mount, "m"), size, 'M')
		if _, err := os.ReadFile(f.Name()); err != nil {
			t.Fatal(err)
		}
		ino := inoOf(t, f.Name())
		m, err := unix.Mmap(int(f.Fd()), 0, size, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
		if err != nil {
			t.Fatal(err)
		}
		defer unix.Munmap(m)
		settle(t, c, rec)
		if err := unix.Madvise(m, unix.MADV_REMOVE); err != nil {
			t.Fatal(err)
		}
		// Coalesced by chunk marks, which grow: a record per 64 KiB at
		// most (257 here), not one a page (8,193 before).
		if n := count(ino); n > size/(64<<10) {
			t.Errorf("one MADV_REMOVE of a cached %d MiB range: %d records of hook 34", size>>20, n)
		}
	})
}

// TestCaptureUringMadviseRemove: IORING_OP_MADVISE runs in an io-wq
// worker; with MADV_REMOVE it punches the file (vfs_fallocate) under
// i_mmap_lock. btrfs_set_extent_bit sends every LOCKED range of an io-wq
// worker to io_worker_fallocate (IORING_OP_FALLOCATE only) and never to
// btrfs_range_locked: the punch is not reported. ext4 and XFS report it.
func TestCaptureUringMadviseRemove(t *testing.T) {
	forEachFS(t, func(t *testing.T, fs *loopfs.FS, c *Capture, rec *recorder) {
		const size = 1 << 20
		f := filledFile(t, filepath.Join(fs.Mount, "f"), size, 'x')
		ino := inoOf(t, f.Name())
		m, err := unix.Mmap(int(f.Fd()), 0, size, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
		if err != nil {
			t.Fatal(err)
		}
		defer unix.Munmap(m)
		settle(t, c, rec)
		r := newRing(t)
		const ioringOpMadvise = 25
		addr := uint64(uintptr(unsafe.Pointer(&m[64<<10])))
		r.put(ioringOpMadvise, iosqeAsync, -1, 0, addr, 128<<10)
		// fadvise_advice: the SQE's u32 at 28 (put left it zero).
		tail := atomic.LoadUint32(r.sqTail) - 1
		idx := tail & r.sqMask
		*(*uint32)(unsafe.Pointer(&r.sqes[idx*64+28])) = unix.MADV_REMOVE
		if _, _, e := unix.Syscall6(unix.SYS_IO_URING_ENTER, uintptr(r.fd), 1, 1, ioringEnterWait, 0, 0); e != 0 {
			t.Fatal(e)
		}
		for atomic.LoadUint32(r.cqTail) == atomic.LoadUint32(r.cqHead) {
			time.Sleep(time.Millisecond)
		}
		head := atomic.LoadUint32(r.cqHead)
		res := *(*int32)(unsafe.Pointer(&r.rings[r.cqesOffset+(head&r.cqMask)*16+8]))
		atomic.StoreUint32(r.cqHead, head+1)
		if res < 0 {
			t.Skipf("IORING_OP_MADVISE(MADV_REMOVE): %v", unix.Errno(-res))
		}
		if m[64<<10] != 0 {
			t.Fatalf("not punched")
		}
		recs := settle(t, c, rec)
		if !coveredAll(recs, ino, 64<<10, 192<<10) && !covers(recs, ino, KindPreop, 64<<10, 192<<10) {
			t.Errorf("MADV_REMOVE through io_uring: [64K, 192K) not reported; records: %v", recs)
		}
	})
}

// TestCaptureUringFallocateThroughOverlay: IORING_OP_FALLOCATE on a file
// of an overlay runs in an io-wq worker: io_worker_fallocate looks at the
// request's file, the overlay's (not watched), and btrfs_range_locked is
// never asked for an io-wq worker. The punch of the btrfs file beneath is
// not reported. ext4 and XFS report it from their own hooks.
func TestCaptureUringFallocateThroughOverlay(t *testing.T) {
	forEachFS(t, func(t *testing.T, fs *loopfs.FS, c *Capture, rec *recorder) {
		merged := overlayOver(t, fs.Mount)
		f := filledFile(t, filepath.Join(merged, "f"), 1<<20, 'x')
		ino := inoOf(t, filepath.Join(fs.Mount, "upper", "f"))
		settle(t, c, rec)
		r := newRing(t)
		if _, err := r.submit(ioringOpFallocate, int(f.Fd()), 64<<10, 128<<10,
			unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE); err != nil {
			t.Fatalf("io_uring fallocate: %v", err)
		}
		recs := settle(t, c, rec)
		if !coveredAll(recs, ino, 64<<10, 192<<10) && !covers(recs, ino, KindPreop, 64<<10, 192<<10) {
			t.Errorf("a punch through io_uring on an overlay file: [64K, 192K) not reported; records: %v", recs)
		}
	})
}

// TestCaptureFsyncUnderConcurrentWritesNotReported: btrfs_sync_file takes i_rwsem
// and i_mmap_lock for writing (BTRFS_ILOCK_MMAP) and, under them, starts
// writeback again (start_ordered_ops, "someone may have dirtied more
// pages"), whose find_lock_delalloc_range sets LOCKED on the dirty
// ranges in the fsyncing task: hook 34 reports them as data again, each
// a record of its own (no mark), though their writes reported them. The
// change's own test asserts fsync makes none (single-threaded, the first
// start_ordered_ops outside the lock cleans everything).
func TestCaptureFsyncUnderConcurrentWritesNotReported(t *testing.T) {
	fsyncs := 0
	n, nbytes := hook34BesideWriters(t, func(f *os.File, stop chan struct{}) {
		for end := time.Now().Add(2 * time.Second); time.Now().Before(end); fsyncs++ {
			unix.Fsync(int(f.Fd()))
		}
		close(stop)
	})
	if n != 0 {
		t.Errorf("%d fsyncs under two writers: %d records of the range lock's hook (%d bytes) for writes already reported", fsyncs, n, nbytes)
	}
}

// hook34BesideWriters runs flush (which closes stop when done) on an 8 MiB
// btrfs file beside two threads rewriting it 4 KiB at a time, and returns
// how many records, and bytes, the range lock's hook (34) reported
// meanwhile.
func hook34BesideWriters(t *testing.T, flush func(f *os.File, stop chan struct{})) (int, uint64) {
	t.Helper()
	loopfs.RequireRoot(t)
	fs := loopfs.Make(t, "btrfs", 256)
	c := openOn(t, "btrfs", fs.Mount)
	rec := newRecorder(c)
	const size = 8 << 20
	f := filledFile(t, filepath.Join(fs.Mount, "f"), size, 'x')
	settle(t, c, rec)
	before := rec.byHook[34]
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for w := 0; w < 2; w++ {
		wg.Add(1)
		go func(w int) {
			defer wg.Done()
			runtime.LockOSThread()
			buf := bytes.Repeat([]byte{byte('a' + w)}, 4096)
			for i := int64(w); ; i += 2 {
				select {
				case <-stop:
					return
				default:
				}
				f.WriteAt(buf, (i*4096)%size)
			}
		}(w)
	}
	go flush(f, stop)
	var reported uint64
	deadline := time.After(60 * time.Second)
loop:
	for {
		select {
		case r := <-rec.ch:
			rec.byHook[r.Hook]++
			if r.Hook == 34 {
				reported += r.Len
			}
		case <-stop:
			break loop
		case <-deadline:
			break loop
		}
	}
	wg.Wait()
	settle(t, c, rec)
	return rec.byHook[34] - before, reported
}

// TestCaptureOverlayPreallocationNotData: a preallocation changes
// no byte; sys_enter_fallocate leaves native ones out. Through overlayfs
// (or FS_IOC_RESVSP64, which is not in btrfs_range_syscall's list) the
// range lock's hook reports every byte of it below the size as data: a
// database in a container that preallocates over its file has the whole
// range read and shipped.
func TestCaptureOverlayPreallocationNotData(t *testing.T) {
	loopfs.RequireRoot(t)
	fs := loopfs.Make(t, "btrfs", 256)
	c := openOn(t, "btrfs", fs.Mount)
	rec := newRecorder(c)
	const size = 64 << 20
	merged := overlayOver(t, fs.Mount)
	f := filledFile(t, filepath.Join(merged, "db"), 0, 0)
	// A sparse file: holes to preallocate.
	if err := f.Truncate(size); err != nil {
		t.Fatal(err)
	}
	f.WriteAt([]byte("x"), 0)
	f.Sync()
	ino := inoOf(t, filepath.Join(fs.Mount, "upper", "db"))
	settle(t, c, rec)
	if err := unix.Fallocate(int(f.Fd()), unix.FALLOC_FL_KEEP_SIZE, 0, size); err != nil {
		t.Fatal(err)
	}
	var n uint64
	for _, r := range settle(t, c, rec) {
		if r.Ino == ino && r.Kind == KindData {
			n += r.Len
		}
	}
	if n > 4096 {
		t.Errorf("a preallocation through overlayfs (no byte changed): %d bytes reported as data", n)
	}
}

// TestCaptureOverlayMmapWhileOtherThreadsMap: sys_exit_mmap finds the mapping
// with bpf_find_vma, which only try-locks the mm (mmap_read_trylock,
// -EBUSY otherwise). Any other thread of the process in mmap, munmap or
// mprotect, holding or waiting for mmap_lock for writing, makes the
// try-lock fail, and the shared mapping made through overlayfs is not
// reported: the whole-file report it needs is lost silently.
func TestCaptureOverlayMmapWhileOtherThreadsMap(t *testing.T) {
	loopfs.RequireRoot(t)
	fs := loopfs.Make(t, "ext4", 64)
	c := openOn(t, "ext4", fs.Mount)
	rec := newRecorder(c)
	merged := overlayOver(t, fs.Mount)
	stop := make(chan struct{})
	var wg sync.WaitGroup
	threads := 3
	if os.Getenv("REVIEW_NO_CONTENTION") != "" {
		threads = 0
	}
	for w := 0; w < threads; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			runtime.LockOSThread()
			for {
				select {
				case <-stop:
					return
				default:
				}
				if m, err := unix.Mmap(-1, 0, 1<<20, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANON); err == nil {
					unix.Mprotect(m, unix.PROT_READ)
					unix.Munmap(m)
				}
			}
		}()
	}
	const n = 200
	inos := map[uint64]bool{}
	for i := 0; i < n; i++ {
		name := filepath.Join(merged, "m"+string(rune('a'+i%26))+string(rune('a'+i/26)))
		f, err := os.OpenFile(name, os.O_RDWR|os.O_CREATE, 0o644)
		if err != nil {
			t.Fatal(err)
		}
		f.WriteAt(make([]byte, 8192), 0)
		m, err := unix.Mmap(int(f.Fd()), 0, 8192, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
		if err != nil {
			t.Fatal(err)
		}
		unix.Munmap(m)
		f.Close()
		inos[inoOf(t, filepath.Join(fs.Mount, "upper", filepath.Base(name)))] = true
	}
	close(stop)
	wg.Wait()
	reported := map[uint64]bool{}
	for _, r := range settle(t, c, rec) {
		if r.Kind == KindMmap && r.Hook == 35 {
			reported[r.Ino] = true
		}
	}
	missed := 0
	for ino := range inos {
		if !reported[ino] {
			missed++
		}
	}
	if missed > 0 {
		t.Errorf("%d of %d shared mappings made through overlayfs, while other threads mapped, got no whole-file report", missed, n)
	}
}
