package capture

import (
	"fmt"
	"runtime"
	"sync/atomic"
	"testing"
	"unsafe"

	"golang.org/x/sys/unix"
)

// ring is the smallest io_uring that runs one request at a time, with
// IOSQE_ASYNC: the request runs in one of the ring's io-wq worker threads,
// which never return from a syscall (no sys_exit_* tracepoint fires for
// what they do).
type ring struct {
	fd         int
	rings      []byte
	sqes       []byte
	sqTail     *uint32
	sqMask     uint32
	sqArray    uintptr
	cqHead     *uint32
	cqTail     *uint32
	cqMask     uint32
	cqesOffset uint32
}

// ringParams is struct io_uring_params (include/uapi/linux/io_uring.h).
type ringParams struct {
	sqEntries, cqEntries, flags, sqThreadCPU, sqThreadIdle, features, wqFd uint32
	resv                                                                   [3]uint32
	sqOff                                                                  struct {
		head, tail, ringMask, ringEntries, flags, dropped, array, resv1 uint32
		userAddr                                                        uint64
	}
	cqOff struct {
		head, tail, ringMask, ringEntries, overflow, cqes, flags, resv1 uint32
		userAddr                                                        uint64
	}
}

const (
	ioringOpFallocate = 17
	ioringOpRead      = 22
	ioringOpWrite     = 23
	iosqeAsync        = 1 << 4
	ioringEnterWait   = 1 // IORING_ENTER_GETEVENTS
	ioringFeatSingle  = 1 // IORING_FEAT_SINGLE_MMAP
	ioringOffSQEs     = 0x10000000
)

func newRing(t *testing.T) *ring {
	t.Helper()
	var p ringParams
	fd, _, errno := unix.Syscall(unix.SYS_IO_URING_SETUP, 4, uintptr(unsafe.Pointer(&p)), 0)
	if errno != 0 {
		t.Skipf("io_uring_setup: %v (io_uring disabled in this kernel?)", errno)
	}
	if p.features&ioringFeatSingle == 0 {
		t.Skip("io_uring without IORING_FEAT_SINGLE_MMAP (kernel older than 5.4)")
	}
	r := &ring{fd: int(fd)}
	size := max(int(p.sqOff.array)+int(p.sqEntries)*4, int(p.cqOff.cqes)+int(p.cqEntries)*16)
	var err error
	if r.rings, err = unix.Mmap(r.fd, 0, size, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED|unix.MAP_POPULATE); err != nil {
		t.Fatalf("mapping the io_uring rings: %v", err)
	}
	if r.sqes, err = unix.Mmap(r.fd, ioringOffSQEs, int(p.sqEntries)*64, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED|unix.MAP_POPULATE); err != nil {
		t.Fatalf("mapping the io_uring SQEs: %v", err)
	}
	t.Cleanup(func() {
		unix.Munmap(r.sqes)
		unix.Munmap(r.rings)
		unix.Close(r.fd)
	})
	at := func(off uint32) *uint32 { return (*uint32)(unsafe.Pointer(&r.rings[off])) }
	r.sqTail, r.sqMask = at(p.sqOff.tail), *at(p.sqOff.ringMask)
	r.sqArray = uintptr(p.sqOff.array)
	r.cqHead, r.cqTail, r.cqMask = at(p.cqOff.head), at(p.cqOff.tail), *at(p.cqOff.ringMask)
	r.cqesOffset = p.cqOff.cqes
	return r
}

// do runs one read or write of buf at off of fd in an io-wq worker and
// returns its result.
func (r *ring) do(op uint8, fd int, buf []byte, off int64) (int, error) {
	defer runtime.KeepAlive(buf)
	return r.submit(op, fd, uint64(off), uint64(uintptr(unsafe.Pointer(&buf[0]))), uint32(len(buf)))
}

// put queues an SQE of op with flags and the given fd, off, addr and len
// fields, without submitting it.
func (r *ring) put(op, flags uint8, fd int, off, addr uint64, n uint32) {
	tail := atomic.LoadUint32(r.sqTail)
	idx := tail & r.sqMask
	sqe := r.sqes[idx*64 : idx*64+64]
	clear(sqe)
	sqe[0] = op
	sqe[1] = flags
	*(*int32)(unsafe.Pointer(&sqe[4])) = int32(fd)
	*(*uint64)(unsafe.Pointer(&sqe[8])) = off
	*(*uint64)(unsafe.Pointer(&sqe[16])) = addr
	*(*uint32)(unsafe.Pointer(&sqe[24])) = n
	*(*uint32)(unsafe.Pointer(&r.rings[r.sqArray+uintptr(idx)*4])) = idx
	atomic.StoreUint32(r.sqTail, tail+1)
}

// submit is do with the SQE's off, addr and len fields as given (their
// meaning depends on op: IORING_OP_FALLOCATE takes the length in addr and
// the mode in len).
func (r *ring) submit(op uint8, fd int, off, addr uint64, n uint32) (int, error) {
	r.put(op, iosqeAsync, fd, off, addr, n)
	_, _, errno := unix.Syscall6(unix.SYS_IO_URING_ENTER, uintptr(r.fd), 1, 1, ioringEnterWait, 0, 0)
	head := atomic.LoadUint32(r.cqHead)
	// A signal (the Go runtime's preemption, SIGURG) ends the wait
	// early: io_uring_enter then returns what it submitted, or EINTR,
	// without the completion (seen once in CI). Wait again, submitting
	// nothing.
	for tries := 0; (errno == 0 || errno == unix.EINTR) && atomic.LoadUint32(r.cqTail) == head; tries++ {
		if tries == 1000 {
			return 0, fmt.Errorf("io_uring_enter returned 1000 times without a completion")
		}
		_, _, errno = unix.Syscall6(unix.SYS_IO_URING_ENTER, uintptr(r.fd), 0, 1, ioringEnterWait, 0, 0)
	}
	if errno != 0 && errno != unix.EINTR {
		return 0, fmt.Errorf("io_uring_enter: %w", errno)
	}
	cqe := r.cqesOffset + (head&r.cqMask)*16
	res := *(*int32)(unsafe.Pointer(&r.rings[cqe+8]))
	atomic.StoreUint32(r.cqHead, head+1)
	if res < 0 {
		return 0, unix.Errno(-res)
	}
	return int(res), nil
}
