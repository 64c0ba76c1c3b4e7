package capture

import (
	"bytes"
	"path/filepath"
	"runtime"
	"sync"
	"testing"
	"time"

	"github.com/duet-ha/duet/pkg/loopfs"
)

// From a second review (forty-first session) of d0aac90.

// TestCaptureUringFsyncUnderConcurrentWritesNotReported: the fsync
// writeback skip (btrfs_range_skipped) looks at the native syscall
// (fsync, fdatasync, msync, the write family, io_uring_enter). But
// IORING_OP_FSYNC never runs inline: io_fsync returns -EAGAIN on a
// non-blocking issue and the request runs in an io-wq worker, which has
// no syscall registers (native_syscall_regs: NULL for PF_IO_WORKER) and
// runs no IORING_OP_FALLOCATE: btrfs_set_extent_bit sends the
// writeback's LOCKED ranges (btrfs_sync_file holds i_rwsem and
// i_mmap_lock) to btrfs_range_locked, which reports them as data at
// once: the very records TestCaptureFsyncUnderConcurrentWritesNotReported
// rules out for fsync(2) come back for every io_uring fsync (and an
// O_SYNC write punted to io-wq).
func TestCaptureUringFsyncUnderConcurrentWritesNotReported(t *testing.T) {
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
	const ioringOpFsync = 3
	var bytesReported uint64
	fsyncs, failed := 0, 0
	go func() {
		runtime.LockOSThread()
		r := newRing(t)
		for end := time.Now().Add(2 * time.Second); time.Now().Before(end); fsyncs++ {
			if _, err := r.submit(ioringOpFsync, int(f.Fd()), 0, 0, 0); err != nil {
				failed++
			}
		}
		close(stop)
	}()
	deadline := time.After(60 * time.Second)
loop:
	for {
		select {
		case r := <-rec.ch:
			rec.byHook[r.Hook]++
			if r.Hook == 34 {
				bytesReported += r.Len
			}
		case <-stop:
			break loop
		case <-deadline:
			break loop
		}
	}
	wg.Wait()
	settle(t, c, rec)
	if n := rec.byHook[34] - before; n != 0 {
		t.Errorf("%d io_uring fsyncs (%d failed) under two writers: %d records of the range lock's hook (%d bytes) for writes already reported", fsyncs, failed, n, bytesReported)
	}
}
