package barrier

// Linux AIO carries durability points too: an io_submit request may be a
// flush (IOCB_CMD_FSYNC, IOCB_CMD_FDSYNC) or a synchronous write
// (RWF_DSYNC or RWF_SYNC, or a descriptor opened with O_SYNC/O_DSYNC), and
// the program learns that the data is durable when it reaps the
// completion. The filter cannot read the requests (they are in the
// caller's memory), so every io_submit comes to the supervisor, which
// reads them the way the kernel will:
//   - a flush: the barrier runs before the call continues, so what the
//     flush covers (writes completed before it was submitted) is on the
//     peer before it can complete; a buffered write submitted before it
//     in the same call is done by the kernel inside io_submit, before the
//     flush, which covers it too: the supervisor writes such writes ahead
//     as it does synchronous ones, so that the barrier covers them;
//   - a synchronous write: the supervisor first writes the same bytes at
//     the same offset itself, runs the barrier, then lets the call
//     continue, which writes them again; the completion thus comes after
//     the peer has the data, as for write(2) on an O_DSYNC file;
//   - anything else continues at once, without a barrier.

import (
	"encoding/binary"
	"errors"
	"fmt"
	"os"

	"golang.org/x/sys/unix"
)

// Linux AIO ABI (include/uapi/linux/aio_abi.h).
const (
	iocbSize       = 64 // struct iocb
	iocbCmdPwrite  = 1
	iocbCmdFsync   = 2
	iocbCmdFdsync  = 3
	iocbCmdPwritev = 8
)

// iocb is what the supervisor needs of a struct iocb.
type iocb struct {
	rwFlags   int
	opcode    uint16
	fd        int
	buf       uint64
	nbytes    uint64 // bytes, or iovecs for IOCB_CMD_PWRITEV
	offset    int64
	reserved2 uint64
}

func parseIocb(b []byte) iocb {
	le := binary.LittleEndian
	return iocb{
		rwFlags:   int(le.Uint32(b[12:])),
		opcode:    le.Uint16(b[16:]),
		fd:        int(int32(le.Uint32(b[20:]))),
		buf:       le.Uint64(b[24:]),
		nbytes:    le.Uint64(b[32:]),
		offset:    int64(le.Uint64(b[40:])),
		reserved2: le.Uint64(b[48:]),
	}
}

// aioSubmit handles io_submit(ctx, nr, iocbpp).
func aioSubmit(listener int, req *seccompNotif, wait Func) {
	cbs, err := readIocbs(int(req.PID), req.Args[2], int64(req.Args[1]))
	if err != nil {
		// Requests the supervisor cannot read may be flushes or
		// synchronous writes: not let through unheld.
		cannotLook(listener, req, err)
		return
	}
	lastFlush := -1
	for i, cb := range cbs {
		if cb.opcode == iocbCmdFsync || cb.opcode == iocbCmdFdsync {
			lastFlush = i
		}
	}
	hold := false
requests:
	for i, cb := range cbs {
		switch cb.opcode {
		case iocbCmdFsync, iocbCmdFdsync:
			hold = true
		case iocbCmdPwrite, iocbCmdPwritev:
			// Before a flush of the same call, any write is one the
			// flush may be taken to cover (TestAIOFlushCoversWriteSubmittedWithIt).
			sync, ok, err := writeAhead(listener, req, cb, i < lastFlush)
			if err != nil {
				cannotLook(listener, req, err)
				return
			}
			if !ok {
				break requests // EBADF: the kernel stops at this request
			}
			hold = hold || sync
		}
	}
	if hold {
		if err := wait(req.NR); err != nil {
			fmt.Fprintf(os.Stderr, "duet exec: io_submit of pid %d failed with EIO: %v\n", req.PID, err)
			fail(listener, req.ID, unix.EIO)
			return
		}
	}
	proceed(listener, req.ID)
}

// readIocbs reads the requests of io_submit up to the first the kernel
// will not get to (unreadable, or with a reserved field set). An error
// says the supervisor could not read them where the kernel can (EPERM).
func readIocbs(pid int, iocbpp uint64, nr int64) ([]iocb, error) {
	var out []iocb
	for done := int64(0); done < nr; {
		n := min(nr-done, 1024) // IOV_MAX
		ptrs := make([]byte, 8*n)
		got, err := unix.ProcessVMReadv(pid, []unix.Iovec{{Base: &ptrs[0], Len: uint64(len(ptrs))}},
			[]unix.RemoteIovec{{Base: uintptr(iocbpp + 8*uint64(done)), Len: len(ptrs)}}, 0)
		if err != nil && !kernelFails(err) {
			return nil, err
		}
		n = min(n, int64(max(got, 0)/8))
		if n == 0 {
			return out, nil
		}
		raw := make([]byte, iocbSize*n)
		remote := make([]unix.RemoteIovec, n)
		for i := range remote {
			remote[i] = unix.RemoteIovec{Base: uintptr(binary.LittleEndian.Uint64(ptrs[8*i:])), Len: iocbSize}
		}
		got, err = unix.ProcessVMReadv(pid, []unix.Iovec{{Base: &raw[0], Len: uint64(len(raw))}}, remote, 0)
		if err != nil && !kernelFails(err) {
			return nil, err
		}
		for i := 0; i < max(got, 0)/iocbSize; i++ {
			cb := parseIocb(raw[iocbSize*i:])
			if cb.reserved2 != 0 {
				return out, nil // EINVAL
			}
			out = append(out, cb)
		}
		if int64(max(got, 0)) < iocbSize*n {
			return out, nil // EFAULT
		}
		done += n
	}
	return out, nil
}

// writeAhead writes a synchronous write request's bytes itself, so that
// the barrier that follows covers them; any write's when flushed (a flush
// follows it in the same call). sync says whether the request is
// synchronous or flushed; ok is false when its descriptor does not exist;
// err, when the supervisor cannot take it (EPERM: see takeCallerFD).
func writeAhead(listener int, req *seccompNotif, cb iocb, flushed bool) (sync, ok bool, err error) {
	if !flushed && cb.rwFlags&(unix.RWF_DSYNC|unix.RWF_SYNC) == 0 && cb.fd < SyncFDBase {
		return false, true, nil // only those descriptors hold O_SYNC/O_DSYNC files
	}
	fd, err := takeFD(listener, req, cb.fd)
	if err != nil {
		if kernelFails(err) {
			return false, false, nil
		}
		return false, false, err
	}
	defer unix.Close(fd)
	fl, err := unix.FcntlInt(uintptr(fd), unix.F_GETFL, 0)
	if err != nil {
		return flushed, true, nil
	}
	if !flushed && fl&unix.O_DSYNC == 0 && cb.rwFlags&(unix.RWF_DSYNC|unix.RWF_SYNC) == 0 {
		return false, true, nil
	}
	if cb.rwFlags&unix.RWF_APPEND != 0 || fl&unix.O_APPEND != 0 && cb.rwFlags&unix.RWF_NOAPPEND == 0 {
		// Written ahead, it would be appended twice.
		warnOnce("an appending write submitted with io_submit, synchronous or followed by a flush in the same call, is not held for the peer")
		return true, true, nil
	}
	pid := int(req.PID)
	var iov []unix.RemoteIovec
	if cb.opcode == iocbCmdPwrite {
		iov = []unix.RemoteIovec{{Base: uintptr(cb.buf), Len: int(min(cb.nbytes, maxEmulatedWrite))}}
	} else if iov, err = readIovecs(pid, cb.buf, cb.nbytes); err != nil {
		if !kernelFails(err) && !errors.Is(err, unix.EINVAL) {
			return false, false, err
		}
		return true, true, nil // the kernel fails the request
	}
	data, err := gather(pid, iov)
	if err != nil {
		if !kernelFails(err) {
			return false, false, err
		}
		return true, true, nil // nothing readable: the kernel fails it as well
	}
	if len(data) == maxEmulatedWrite {
		warnOnce(fmt.Sprintf("a synchronous write of %d MiB or more submitted with io_submit: only its first %d MiB are held for the peer", maxEmulatedWrite>>20, maxEmulatedWrite>>20))
	}
	// The request's own flags, so that the kernel checks them alike, but
	// waiting for room rather than failing, and no polled completion.
	rwf := cb.rwFlags &^ (unix.RWF_NOWAIT | unix.RWF_HIPRI)
	if err := pwriteAll(fd, data, cb.offset, rwf, fl&unix.O_DIRECT != 0); err != nil {
		// The kernel's own attempt most likely fails the same way.
		warnOnce(fmt.Sprintf("a synchronous write submitted with io_submit could not be written ahead (%v): if it succeeds, it may complete before the peer has it", err))
	}
	return true, true, nil
}

// pwriteAll writes data at off, from page-aligned memory when the file
// is open with O_DIRECT (which refuses unaligned buffers).
func pwriteAll(fd int, data []byte, off int64, rwf int, direct bool) error {
	if direct {
		buf, err := unix.Mmap(-1, 0, len(data), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
		if err != nil {
			return err
		}
		defer unix.Munmap(buf)
		copy(buf, data)
		data = buf
	}
	for len(data) > 0 {
		n, err := unix.Pwritev2(fd, [][]byte{data}, off, rwf)
		if err != nil {
			return err
		}
		if n == 0 {
			return unix.EIO
		}
		data, off = data[n:], off+int64(n)
	}
	return nil
}
