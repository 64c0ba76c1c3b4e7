package capture

import (
	"os"
	"runtime"
	"testing"
	"time"
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
	const ioringOpFsync = 3
	fsyncs, failed := 0, 0
	n, nbytes := hook34BesideWriters(t, func(f *os.File, stop chan struct{}) {
		runtime.LockOSThread()
		r := newRing(t)
		for end := time.Now().Add(2 * time.Second); time.Now().Before(end); fsyncs++ {
			if _, err := r.submit(ioringOpFsync, int(f.Fd()), 0, 0, 0); err != nil {
				failed++
			}
		}
		close(stop)
	})
	if n != 0 {
		t.Errorf("%d io_uring fsyncs (%d failed) under two writers: %d records of the range lock's hook (%d bytes) for writes already reported", fsyncs, failed, n, nbytes)
	}
}
