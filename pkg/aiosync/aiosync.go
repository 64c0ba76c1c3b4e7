// Package aiosync flushes files without holding one of the Go runtime's
// Ps for the flush's length.
//
// A goroutine in a system call keeps its P until the runtime's monitor
// (sysmon) takes it back, after 20 µs to 10 ms depending on how long the
// monitor naps. An fsync takes hundreds of microseconds to milliseconds,
// and a supervisor answering 16 of MariaDB's threads at once ran 16 of
// them: with 2 Ps, every other goroutine (the pipeline that ships the
// data the flushes wait for) waited for the monitor to hand a P over,
// once per flush. Linux AIO runs a flush on a kernel worker instead
// (IOCB_CMD_FSYNC, IOCB_CMD_FDSYNC: vfs_fsync there, as fsync(2) does),
// and signals its end on an eventfd that Go's network poller watches:
// the goroutine that asked waits on a channel, holding no P.
//
// When AIO is not there (io_setup fails: no CONFIG_AIO, fs.aio-max-nr
// reached) or a request cannot be queued (EAGAIN with the context full,
// EINVAL for a file without fsync), Sync runs the flush itself, as
// before: the outcome is the same, only the P is held.
package aiosync

import (
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"runtime"
	"sync"
	"unsafe"

	"golang.org/x/sys/unix"
)

// Linux AIO ABI (include/uapi/linux/aio_abi.h).
const (
	iocbCmdFsync  = 2
	iocbCmdFdsync = 3
	iocbFlagResfd = 1 << 0
	// depth is the context's size: flushes queued at once beyond it
	// are run by their caller.
	depth = 256
)

// ioEvent is struct io_event.
type ioEvent struct {
	data uint64
	obj  uint64
	res  int64
	res2 int64
}

// context is the process's AIO context, its eventfd in Go's poller, and
// the flushes in flight by id.
type context struct {
	ctx     uint64
	efd     *os.File // in Go's poller: never call its Fd, which makes it blocking
	efdNum  int
	mu      sync.Mutex
	next    uint64
	waiting map[uint64]chan error
	broken  error // under mu: reaping failed; flushes are run by their callers
}

// errBroken tells a caller its queued flush's end cannot be heard. It is
// not flushed again: Linux reports a writeback error once per open file,
// so a second flush after a failed first one returns 0 (the review's
// ENOSPC case). The caller gets EIO.
var errBroken = errors.New("aiosync: completions cannot be reaped")

var (
	once    sync.Once
	shared  *context
	initErr error
)

func get() (*context, error) {
	once.Do(func() { shared, initErr = open() })
	return shared, initErr
}

func open() (*context, error) {
	var ctx uint64
	if _, _, errno := unix.Syscall(unix.SYS_IO_SETUP, depth, uintptr(unsafe.Pointer(&ctx)), 0); errno != 0 {
		return nil, fmt.Errorf("io_setup: %w", errno)
	}
	fd, err := unix.Eventfd(0, unix.EFD_CLOEXEC|unix.EFD_NONBLOCK)
	if err != nil {
		unix.Syscall(unix.SYS_IO_DESTROY, uintptr(ctx), 0, 0)
		return nil, fmt.Errorf("eventfd: %w", err)
	}
	c := &context{ctx: ctx, efd: os.NewFile(uintptr(fd), "aiosync-eventfd"), efdNum: fd, waiting: map[uint64]chan error{}}
	go c.reap()
	return c, nil
}

// reap hands each completed flush's result to its caller. It waits for
// the eventfd in Go's poller, then takes what completed without waiting.
func (c *context) reap() {
	err := c.reapLoop()
	c.mu.Lock()
	defer c.mu.Unlock()
	c.broken = err
	for id, ch := range c.waiting {
		delete(c.waiting, id)
		ch <- errBroken
	}
}

// reapLoop returns only when reaping fails, which nothing but a bug (an
// eventfd closed, a context destroyed) can make it do.
func (c *context) reapLoop() error {
	var evs [64]ioEvent
	var count [8]byte
	zero := unix.Timespec{}
	for {
		if _, err := c.efd.Read(count[:]); err != nil {
			if errors.Is(err, unix.EINTR) || errors.Is(err, unix.EAGAIN) {
				continue
			}
			return fmt.Errorf("reading the completion eventfd: %w", err)
		}
		for {
			n, _, errno := unix.Syscall6(unix.SYS_IO_GETEVENTS, uintptr(c.ctx), 0, uintptr(len(evs)),
				uintptr(unsafe.Pointer(&evs[0])), uintptr(unsafe.Pointer(&zero)), 0)
			if errno == unix.EINTR {
				continue
			}
			if errno != 0 {
				return fmt.Errorf("io_getevents: %w", errno)
			}
			c.mu.Lock()
			for _, ev := range evs[:n] {
				ch := c.waiting[ev.data]
				delete(c.waiting, ev.data)
				var err error
				if ev.res < 0 {
					err = unix.Errno(-ev.res)
				}
				if ch != nil {
					ch <- err
				}
			}
			c.mu.Unlock()
			if int(n) < len(evs) {
				break
			}
		}
	}
}

// submit queues a flush of fd; the channel gets its result.
func (c *context) submit(fd int, datasync bool) (chan error, error) {
	ch := make(chan error, 1)
	c.mu.Lock()
	if c.broken != nil {
		c.mu.Unlock()
		return nil, c.broken
	}
	c.next++
	id := c.next
	c.waiting[id] = ch
	c.mu.Unlock()
	// struct iocb, in the machine's byte order. ptrs holds its address
	// as a pointer, which a move of the goroutine's stack updates.
	cb := new([64]byte)
	ne := binary.NativeEndian
	op := uint16(iocbCmdFsync)
	if datasync {
		op = iocbCmdFdsync
	}
	ne.PutUint64(cb[0:], id)                // aio_data
	ne.PutUint16(cb[16:], op)               // aio_lio_opcode
	ne.PutUint32(cb[20:], uint32(fd))       // aio_fildes
	ne.PutUint32(cb[56:], iocbFlagResfd)    // aio_flags
	ne.PutUint32(cb[60:], uint32(c.efdNum)) // aio_resfd
	ptrs := [1]unsafe.Pointer{unsafe.Pointer(cb)}
	for {
		n, _, errno := unix.Syscall(unix.SYS_IO_SUBMIT, uintptr(c.ctx), 1, uintptr(unsafe.Pointer(&ptrs[0])))
		runtime.KeepAlive(ptrs)
		if errno == unix.EINTR {
			continue
		}
		if errno != 0 || n != 1 {
			c.mu.Lock()
			delete(c.waiting, id)
			c.mu.Unlock()
			if errno == 0 {
				errno = unix.EAGAIN
			}
			return nil, errno
		}
		return ch, nil
	}
}

// Sync flushes fd's file, its data only when datasync (fdatasync(2)),
// and returns the flush's error. The flush runs on a kernel worker when
// it can be queued there; the caller waits without holding a P.
func Sync(fd int, datasync bool) error { return Start(fd, datasync)() }

// Start queues a flush as Sync does and returns what waits for its
// result, so that several files can be flushed at once. fd must stay
// open until the wait returns. A flush that cannot be queued is run
// before Start returns.
func Start(fd int, datasync bool) (wait func() error) {
	if c, err := get(); err == nil {
		if ch, err := c.submit(fd, datasync); err == nil {
			return func() error {
				if err := <-ch; err != errBroken {
					return err
				}
				return fmt.Errorf("%w (%v)", unix.EIO, errBroken)
			}
		}
	}
	err := direct(fd, datasync)
	return func() error { return err }
}

// direct is the flush run by the caller.
func direct(fd int, datasync bool) error {
	if datasync {
		return unix.Fdatasync(fd)
	}
	return unix.Fsync(fd)
}

// Available says whether flushes are queued to the kernel (io_setup
// worked), or why not.
func Available() error {
	_, err := get()
	return err
}
