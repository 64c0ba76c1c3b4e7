package capture

import (
	"runtime"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// An io_uring write linked (hard link) after a 50 ms timeout runs from
// task_work on the submitter's next return to user mode. Here that return
// is from an fchmod(2) (a flushed syscall) that a seccomp supervisor holds
// for 200 ms and answers with an error: ENOSYS (regs->ax == -ENOSYS after
// the exit tracepoint) or EPERM. The write's inode update (btrfs sets the
// ctime and mtime in btrfs_write_check) must be reported either way: a
// capture that kept it for the syscall's exit (taking ax = -ENOSYS for a
// syscall's body) reported it only at the thread's next hooked exit, after
// the write's completion was seen (from a review).
func TestUringWriteAfterENOSYSReturnHasAttr(t *testing.T) {
	for _, errno := range []syscall.Errno{unix.EPERM, unix.ENOSYS} {
		t.Run(errno.Error(), func(t *testing.T) { testUringWriteAfterErrnoReturn(t, errno) })
	}
}

type sockFilter struct {
	code   uint16
	jt, jf uint8
	k      uint32
}

type sockFprog struct {
	n      uint16
	_      [6]byte
	filter *sockFilter
}

func testUringWriteAfterErrnoReturn(t *testing.T, answer syscall.Errno) {
	c, f, ino := btrfsFile(t)
	if err := unix.Fallocate(int(f.Fd()), 0, 0, 4<<20); err != nil {
		t.Fatal(err)
	}
	var st syscall.Stat_t
	syscall.Fstat(int(f.Fd()), &st)
	rc := newRecorder(c)
	rc.drain()
	forgetFile(t, c, ino, 2<<20)
	c.ForgetAttr(InodeKey{Dev: KernelDev(st.Dev), Ino: ino})
	before, _ := c.Counters()
	r := newRing(t)
	buf := make([]byte, 4096)
	listener := make(chan int, 1)
	done := make(chan error, 1)
	var atCompletion atomic.Uint64
	go func() {
		runtime.LockOSThread() // never unlocked: the thread (and its filter) exits with the goroutine
		prog := []sockFilter{
			{0x20, 0, 0, 4},          // ld arch
			{0x15, 0, 3, 0xc000003e}, // x86_64?
			{0x20, 0, 0, 0},          // ld nr
			{0x15, 0, 1, unix.SYS_FCHMOD},
			{0x06, 0, 0, 0x7fc00000}, // SECCOMP_RET_USER_NOTIF
			{0x06, 0, 0, 0x7fff0000}, // SECCOMP_RET_ALLOW
		}
		fp := sockFprog{n: uint16(len(prog)), filter: &prog[0]}
		// SECCOMP_SET_MODE_FILTER, NEW_LISTENER | WAIT_KILLABLE_RECV
		lfd, _, e := unix.Syscall(unix.SYS_SECCOMP, 1, 1<<3|1<<5, uintptr(unsafe.Pointer(&fp)))
		runtime.KeepAlive(prog)
		if e != 0 {
			listener <- -1
			done <- e
			return
		}
		listener <- int(lfd)
		ts := [2]int64{0, 50e6}
		head := atomic.LoadUint32(r.cqHead)
		r.put(11, 1<<3, -1, 0, uint64(uintptr(unsafe.Pointer(&ts))), 1) // IORING_OP_TIMEOUT, IOSQE_IO_HARDLINK
		r.put(ioringOpWrite, 0, int(f.Fd()), 0, uint64(uintptr(unsafe.Pointer(&buf[0]))), 4096)
		if _, _, e := unix.Syscall6(unix.SYS_IO_URING_ENTER, uintptr(r.fd), 2, 0, 0, 0, 0); e != 0 {
			done <- e
			return
		}
		// Held by the supervisor past the timeout; the linked write runs
		// from task_work when this returns. Not RawSyscall: the Go
		// runtime takes a goroutine in one for running code, holding
		// its P and never stopping; a GC that began meanwhile spun in
		// suspendG for it on one P while the supervisor's goroutine,
		// which would answer, waited for the other (the test hung,
		// spinning a CPU).
		_, _, e = unix.Syscall(unix.SYS_FCHMOD, f.Fd(), 0o644, 0)
		for start := time.Now(); atomic.LoadUint32(r.cqTail)-head < 2; {
			if time.Since(start) > 5*time.Second {
				t.Errorf("no completions")
				break
			}
		}
		// The caller has seen the write complete: a durability call
		// made now waits for the records emitted so far.
		cn, _ := c.Counters()
		atCompletion.Store(cn.Seq)
		cqe := r.cqesOffset + ((head+1)&r.cqMask)*16
		t.Logf("fchmod: %v; write result %d; seq at its completion %d", e, *(*int32)(unsafe.Pointer(&r.rings[cqe+8])), cn.Seq)
		atomic.StoreUint32(r.cqHead, head+2)
		runtime.KeepAlive(ts)
		runtime.KeepAlive(buf)
		done <- nil
	}()
	lfd := <-listener
	if lfd >= 0 {
		// Closed on every way out: a held fchmod is then answered
		// (ENOSYS), and its thread ends. (Left held, when it was a
		// RawSyscall, the next stop-the-world waited for it for ever:
		// the whole test binary hung.)
		closed := false
		closeListener := func() {
			if !closed {
				closed = true
				unix.Close(lfd)
			}
		}
		defer closeListener()
		var notif [80]byte
		_, _, e := unix.Syscall(unix.SYS_IOCTL, uintptr(lfd), 0xC0502100, uintptr(unsafe.Pointer(&notif[0])))
		// EINTR: a signal (Go's preemption) to this thread ended the
		// wait. ENOENT: one to the held thread did, before the
		// receive: its notification was withdrawn, and the restarted
		// fchmod sends another (the supervisor in pkg/barrier receives
		// again the same way). ENOENT at once, again and again, if the
		// thread ended without its fchmod (no process left on the
		// filter): it said why.
		for (e == unix.EINTR || e == unix.ENOENT) && len(done) == 0 {
			_, _, e = unix.Syscall(unix.SYS_IOCTL, uintptr(lfd), 0xC0502100, uintptr(unsafe.Pointer(&notif[0])))
		}
		if e != 0 && len(done) > 0 {
			closeListener()
			t.Fatalf("NOTIF_RECV: %v; the writer's thread ended first: %v", e, <-done)
		}
		// On the ways out below the writer goes on once the listener
		// is closed: it is waited for (at most its 5 s for the
		// completions), or it read the ring after the test's cleanup
		// unmapped it and the fault killed the whole binary (from a
		// review).
		if e != 0 {
			closeListener()
			<-done
			t.Fatalf("NOTIF_RECV: %v", e)
		}
		// A collection while the call is held must complete: the
		// held goroutine is in a syscall, which the runtime can scan.
		runtime.GC()
		time.Sleep(200 * time.Millisecond)
		var resp [24]byte
		copy(resp[:8], notif[:8])
		*(*int32)(unsafe.Pointer(&resp[16])) = -int32(answer)
		if _, _, e := unix.Syscall(unix.SYS_IOCTL, uintptr(lfd), 0xC0182101, uintptr(unsafe.Pointer(&resp[0]))); e != 0 {
			closeListener()
			<-done
			t.Fatalf("NOTIF_SEND: %v", e)
		}
		if err := <-done; err != nil {
			t.Fatal(err)
		}
		closeListener()
	} else if err := <-done; err != nil {
		t.Fatal(err)
	}
	time.Sleep(100 * time.Millisecond) // the thread is gone by now
	var attr, data bool
	for _, rec := range rc.drain() {
		if rec.Seq > before.Seq && rec.Ino == ino {
			t.Logf("%+v", rec)
			attr = attr || (rec.Kind == KindAttr && rec.Seq <= atCompletion.Load())
			data = data || (rec.Kind == KindData && rec.Pos == 0)
		}
	}
	if !data {
		t.Errorf("the write has no data record")
	}
	if !attr {
		t.Errorf("the write's inode update (ctime, mtime) has no record by the time the write's completion was seen (%d records then): it was deferred to an exit that had already run", atCompletion.Load())
	}
}
