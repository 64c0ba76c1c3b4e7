package capture

import (
	"errors"
	"fmt"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
	"unsafe"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"
)

// eventRing reads the capture's ring buffer.
//
// The kernel lays a BPF ring buffer's data pages out twice in a row, so
// that a record that wraps past the end reads as one piece; a reader that
// maps them that way (cilium/ebpf's) has every data page mapped twice, and
// each counts in the daemon's RSS: a 16 MiB ring showed as 32 MiB. This
// reader maps the data pages once and copies a record that wraps in two
// parts. A record's 8-byte header never wraps: positions are multiples of
// 8 and the ring's size a multiple of the page.
//
// A read waits in Go's network poller, not in a blocking epoll_wait: the
// ring's own epoll (the ring, flush and stop) is registered with it as
// one more file. A goroutine blocked in a system call keeps its P until
// the runtime's monitor takes it back, which with the monitor's timer
// slack (pkg/sysmon) is up to about 2 ms: the reader, which waits
// between almost every durability call, held one of the daemon's two Ps
// while the supervisor's and the pipeline's goroutines waited for one.
type eventRing struct {
	mu       sync.Mutex // held by a read, and by close for the unmap
	end      uint64     // the position past the last record read (read's caller)
	consPage []byte     // the consumer position's page, writable
	prodPage []byte     // the producer position's page, then the data pages
	data     []byte     // prodPage past its first page
	mask     uint64

	epfd int
	// epFile owns epfd once made (nonblocking, in Go's poller). Its
	// read deadline is the last one set (lastDeadline).
	epFile       *os.File
	epConn       syscall.RawConn
	lastDeadline time.Time
	flush        int // eventfd: a read returns what is there now (Kick)
	stop         int // eventfd: a read returns os.ErrClosed
	// closing is set before stop is written: a read that begins after it
	// returns os.ErrClosed without waiting.
	closing atomic.Bool
	closed  bool       // under mu: unmapped and closed
	fdMu    sync.Mutex // kick's and close's writes against the eventfds' close
	events  [3]unix.EpollEvent
}

// errFlushed: a read was cut short by flush after the ring held nothing.
var errFlushed = errors.New("ring buffer flushed")

const (
	ringHdrSize    = 8
	ringBusyBit    = 1 << 31
	ringDiscardBit = 1 << 30
)

// newEventRing maps m, a BPF_MAP_TYPE_RINGBUF, for reading.
func newEventRing(m *ebpf.Map) (_ *eventRing, err error) {
	size := int(m.MaxEntries())
	page := os.Getpagesize()
	if m.Type() != ebpf.RingBuf || size < page || size&(size-1) != 0 {
		return nil, fmt.Errorf("map %v of %d bytes is not a ring buffer of a power of two pages", m.Type(), size)
	}
	r := &eventRing{mask: uint64(size - 1), epfd: -1, flush: -1, stop: -1}
	defer func() {
		if err != nil {
			r.release()
		}
	}()
	fd := m.FD()
	if r.consPage, err = unix.Mmap(fd, 0, page, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED); err != nil {
		return nil, fmt.Errorf("mapping the ring buffer's consumer page: %w", err)
	}
	if r.prodPage, err = unix.Mmap(fd, int64(page), page+size, unix.PROT_READ, unix.MAP_SHARED); err != nil {
		return nil, fmt.Errorf("mapping the ring buffer's data pages: %w", err)
	}
	r.data = r.prodPage[page:]
	if r.epfd, err = unix.EpollCreate1(unix.EPOLL_CLOEXEC); err != nil {
		return nil, fmt.Errorf("creating the ring buffer's epoll: %w", err)
	}
	for _, p := range []*int{&r.flush, &r.stop} {
		if *p, err = unix.Eventfd(0, unix.EFD_CLOEXEC|unix.EFD_NONBLOCK); err != nil {
			return nil, fmt.Errorf("creating the ring buffer's eventfd: %w", err)
		}
	}
	for _, f := range []int{fd, r.flush, r.stop} {
		ev := unix.EpollEvent{Events: unix.EPOLLIN, Fd: int32(f)}
		if err = unix.EpollCtl(r.epfd, unix.EPOLL_CTL_ADD, f, &ev); err != nil {
			return nil, fmt.Errorf("polling the ring buffer: %w", err)
		}
	}
	if err = unix.SetNonblock(r.epfd, true); err != nil {
		return nil, fmt.Errorf("polling the ring buffer: %w", err)
	}
	r.epFile = os.NewFile(uintptr(r.epfd), "capture-ring-epoll")
	if r.epConn, err = r.epFile.SyscallConn(); err != nil {
		return nil, fmt.Errorf("polling the ring buffer: %w", err)
	}
	// os.NewFile says nothing when the poller refuses the file (epoll's
	// ENOSPC once fs.epoll.max_user_watches is used up): every read
	// would fail then. A file outside the poller takes no deadline.
	if err = r.epFile.SetReadDeadline(time.Time{}); err != nil {
		return nil, fmt.Errorf("polling the ring buffer: Go's poller did not take it: %w", err)
	}
	return r, nil
}

// reserved is the producer position: past every record reserved so far.
func (r *eventRing) reserved() uint64 { return atomic.LoadUint64(r.prodPos()) }

func (r *eventRing) consPos() *uint64 { return (*uint64)(unsafe.Pointer(&r.consPage[0])) }
func (r *eventRing) prodPos() *uint64 { return (*uint64)(unsafe.Pointer(&r.prodPage[0])) }

// available is the bytes the producer wrote that are not read yet. Not
// to be called concurrently with close (Capture.mu orders them).
func (r *eventRing) available() int {
	if r.closing.Load() {
		return 0
	}
	return int(atomic.LoadUint64(r.prodPos()) - atomic.LoadUint64(r.consPos()))
}

// read returns the next record's bytes in buf (grown as needed). With
// the ring empty it waits until the producer wakes it, deadline passes
// (os.ErrDeadlineExceeded), flush is called (errFlushed) or close is
// (os.ErrClosed).
func (r *eventRing) read(buf []byte, deadline time.Time) ([]byte, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	for {
		if r.closed || r.closing.Load() {
			return buf, os.ErrClosed
		}
		out, ok, err := r.next(buf)
		if ok || err != nil {
			return out, err
		}
		if err := r.wait(deadline); err != nil {
			// After a deadline or a flush the caller reads again,
			// which finds what arrived meanwhile without a wake-up.
			return buf, err
		}
	}
}

// next copies out the next committed record, skipping discarded ones;
// ok is false when none is there yet.
func (r *eventRing) next(buf []byte) ([]byte, bool, error) {
	cons := atomic.LoadUint64(r.consPos())
	for {
		prod := atomic.LoadUint64(r.prodPos())
		if prod == cons {
			return buf, false, nil
		}
		if prod-cons < ringHdrSize {
			return buf, false, fmt.Errorf("ring buffer: %d bytes past the consumer, less than a header", prod-cons)
		}
		// The length word is written last by the kernel (an xchg that
		// clears the busy bit): loaded atomically, it orders the reads
		// of the record after it.
		hdr := atomic.LoadUint32((*uint32)(unsafe.Pointer(&r.data[cons&r.mask])))
		if hdr&ringBusyBit != 0 {
			// Reserved, not committed yet: the records after it wait
			// for it, as the kernel's order requires.
			return buf, false, nil
		}
		n := uint64(hdr &^ (ringBusyBit | ringDiscardBit))
		end := cons + ringHdrSize + (n+7)&^7
		if end-cons > r.mask+1 || prod-cons < end-cons {
			return buf, false, fmt.Errorf("ring buffer: a record of %d bytes at %d past the producer's %d", n, cons, prod)
		}
		if hdr&ringDiscardBit == 0 {
			buf = buf[:0]
			start := (cons + ringHdrSize) & r.mask
			first := min(n, r.mask+1-start)
			buf = append(buf, r.data[start:start+first]...)
			buf = append(buf, r.data[:n-first]...)
		}
		cons = end
		atomic.StoreUint64(r.consPos(), cons)
		if hdr&ringDiscardBit == 0 {
			r.end = end
			return buf, true, nil
		}
	}
}

// wait blocks until the producer or flush wakes the ring, or deadline.
// It parks in Go's poller until the ring's epoll has an event, and then
// takes the events without blocking.
func (r *eventRing) wait(deadline time.Time) error {
	if !deadline.Equal(r.lastDeadline) {
		if err := r.epFile.SetReadDeadline(deadline); err != nil {
			return fmt.Errorf("waiting on the ring buffer: %w", err)
		}
		r.lastDeadline = deadline
	}
	var n int
	var werr error
	err := r.epConn.Read(func(uintptr) bool {
		for {
			n, werr = unix.EpollWait(r.epfd, r.events[:], 0)
			if !errors.Is(werr, unix.EINTR) {
				return n > 0 || werr != nil
			}
		}
	})
	if err == nil {
		err = werr
	}
	if errors.Is(err, os.ErrDeadlineExceeded) {
		return os.ErrDeadlineExceeded
	}
	if err != nil {
		return fmt.Errorf("waiting on the ring buffer: %w", err)
	}
	var flushed bool
	for _, ev := range r.events[:n] {
		switch int(ev.Fd) {
		case r.stop:
			return os.ErrClosed
		case r.flush:
			var b [8]byte
			_, _ = unix.Read(r.flush, b[:])
			flushed = true
		}
	}
	if flushed {
		return errFlushed
	}
	return nil
}

// kick makes a waiting read (or the next one) return what the ring holds
// now, then errFlushed.
func (r *eventRing) kick() {
	r.fdMu.Lock()
	defer r.fdMu.Unlock()
	if r.flush >= 0 && !r.closing.Load() {
		one := [8]byte{1}
		_, _ = unix.Write(r.flush, one[:])
	}
}

// close makes reads return os.ErrClosed, waits for one in progress, and
// unmaps the ring.
func (r *eventRing) close() {
	if r.closing.Swap(true) {
		return
	}
	r.fdMu.Lock()
	one := [8]byte{1}
	_, _ = unix.Write(r.stop, one[:])
	r.fdMu.Unlock()
	r.mu.Lock()
	defer r.mu.Unlock()
	r.fdMu.Lock()
	defer r.fdMu.Unlock()
	r.release()
	r.closed = true
}

func (r *eventRing) release() {
	for _, m := range []*[]byte{&r.consPage, &r.prodPage} {
		if *m != nil {
			_ = unix.Munmap(*m)
			*m = nil
		}
	}
	r.data = nil
	if r.epFile != nil {
		_ = r.epFile.Close() // closes epfd
		r.epFile, r.epConn, r.epfd = nil, nil, -1
	}
	for _, fd := range []*int{&r.epfd, &r.flush, &r.stop} {
		if *fd >= 0 {
			_ = unix.Close(*fd)
			*fd = -1
		}
	}
}
