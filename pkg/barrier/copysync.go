package barrier

// The kernel's own copies into a file (sendfile, copy_file_range, splice)
// are synchronous on an O_SYNC/O_DSYNC file, as write(2) is: the program
// learns that the bytes are durable when the call returns. Such files sit
// at descriptors of SyncFDBase and above (see dsync.go), so the filter
// sends these calls there to the supervisor, which makes the copy itself
// on the caller's own open file descriptions (their offsets and flags are
// shared), waits for the barrier, then answers with the copy's result.

import (
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"time"

	"golang.org/x/sys/unix"
)

// copySync handles sendfile, copy_file_range and splice whose destination
// is a descriptor of SyncFDBase or above. Offsets passed by pointer are
// read from the caller's memory and the moved ones written back, as the
// kernel does.
func copySync(listener int, req *seccompNotif, sup supervisor, start time.Time) {
	var in, out int
	var inOffAddr, outOffAddr, count uint64
	switch req.NR {
	case unix.SYS_SENDFILE: // out, in, *offset, count
		out, in, inOffAddr, count = int(int32(req.Args[0])), int(int32(req.Args[1])), req.Args[2], req.Args[3]
	default: // copy_file_range and splice: in, *off_in, out, *off_out, len, flags
		in, inOffAddr, out, outOffAddr, count = int(int32(req.Args[0])), req.Args[1], int(int32(req.Args[2])), req.Args[3], req.Args[4]
	}
	outFD, ok := takeCallerFD(listener, req, out, sup.install.any.Load())
	if !ok {
		return
	}
	defer unix.Close(outFD)
	fl, err := unix.FcntlInt(uintptr(outFD), unix.F_GETFL, 0)
	var st unix.Stat_t
	if err != nil || fl&unix.O_DSYNC == 0 || unix.Fstat(outFD, &st) != nil || st.Mode&unix.S_IFMT != unix.S_IFREG {
		proceed(listener, req.ID) // not a durability point: a file's copy is
		return
	}
	if fl&unix.O_ACCMODE == unix.O_RDONLY || fl&unix.O_PATH != 0 {
		// EBADF, from the kernel: nothing may be done for this call, the
		// setuid bit cleared least of all (TestCopyIntoReadOnlyDescriptorLeavesSetuid).
		proceed(listener, req.ID)
		return
	}
	inFD, ok := takeCallerFD(listener, req, in, true)
	if !ok {
		return
	}
	defer unix.Close(inFD)
	pid := int(req.PID)
	var inOff, outOff int64
	var inP, outP *int64
	if inOffAddr != 0 {
		if err := readInt64(pid, inOffAddr, &inOff); err != nil {
			fail(listener, req.ID, unix.EFAULT)
			return
		}
		inP = &inOff
	}
	if outOffAddr != 0 {
		if err := readInt64(pid, outOffAddr, &outOff); err != nil {
			fail(listener, req.ID, unix.EFAULT)
			return
		}
		outP = &outOff
	}
	n := int(min(count, maxEmulatedWrite))
	if n > 0 {
		if err := killPrivs(outFD, pid); err != nil {
			fail(listener, req.ID, asErrno(err))
			return
		}
	}
	var got int
	switch req.NR {
	case unix.SYS_SENDFILE:
		got, err = unix.Sendfile(outFD, inFD, inP, n)
	case unix.SYS_COPY_FILE_RANGE:
		got, err = unix.CopyFileRange(inFD, inP, outFD, outP, n, int(req.Args[5]))
	case unix.SYS_SPLICE:
		got, err = spliceFor(listener, req, inFD, inP, outFD, outP, n, int(req.Args[5]))
		if errors.Is(err, errCallerGone) {
			return // nothing to answer
		}
	}
	if err != nil {
		fail(listener, req.ID, asErrno(err))
		return
	}
	// The kernel writes the moved offsets back after the copy, and fails
	// the call with EFAULT if it cannot.
	if inP != nil && writeInt64(pid, inOffAddr, inOff) != nil || outP != nil && writeInt64(pid, outOffAddr, outOff) != nil {
		fail(listener, req.ID, unix.EFAULT)
		return
	}
	var waited time.Duration
	if got > 0 {
		if waited, err = sup.hold(req.NR); err != nil {
			fmt.Fprintf(os.Stderr, "duet exec: synchronous copy (call %d) of pid %d failed with EIO: %v\n", req.NR, req.PID, err)
			fail(listener, req.ID, unix.EIO)
			return
		}
	}
	sup.done(req.NR, start, waited, time.Since(start)-waited)
	reply(listener, &seccompNotifResp{ID: req.ID, Val: int64(got)})
}

// errCallerGone: the call's notification is no longer valid (its caller
// was killed).
var errCallerGone = errors.New("the caller is gone")

// spliceFor makes the caller's splice. Its input is a pipe, which may be
// empty: the kernel's splice waits for data, and ends with its caller. The
// supervisor's, on its own duplicates of the descriptors, would go on
// waiting after the caller was killed (it cannot be interrupted otherwise:
// the filter waits killable), keep the pipe open (its writer not told
// there is no reader), and write the next bytes into the file after the
// program died (TestSpliceFromPipeEndsWithItsCaller, from a review). It
// waits in steps, asking whether the call is still pending. A caller that
// asked not to wait (SPLICE_F_NONBLOCK, or a pipe of its own that does not
// block) gets EAGAIN as from the kernel.
// spliceStep is how long, in ms, an emulated splice waits for its pipe
// before asking again whether its caller is still there: how long the
// supervisor may hold a killed caller's pipe open.
const spliceStep = 20

func spliceFor(listener int, req *seccompNotif, in int, inOff *int64, out int, outOff *int64, n, flags int) (int, error) {
	fl, err := unix.FcntlInt(uintptr(in), unix.F_GETFL, 0)
	callerNonblock := flags&unix.SPLICE_F_NONBLOCK != 0 || err == nil && fl&unix.O_NONBLOCK != 0
	for {
		g, err := unix.Splice(in, inOff, out, outOff, n, flags|unix.SPLICE_F_NONBLOCK)
		if !errors.Is(err, unix.EAGAIN) || callerNonblock {
			return int(g), err
		}
		pfd := []unix.PollFd{{Fd: int32(in), Events: unix.POLLIN}}
		unix.Poll(pfd, spliceStep)
		if notifValid(listener, req.ID) != nil {
			return 0, errCallerGone
		}
	}
}

func readInt64(pid int, addr uint64, v *int64) error {
	var b [8]byte
	if err := readMem(pid, addr, b[:]); err != nil {
		return err
	}
	*v = int64(binary.LittleEndian.Uint64(b[:]))
	return nil
}

func writeInt64(pid int, addr uint64, v int64) error {
	var b [8]byte
	binary.LittleEndian.PutUint64(b[:], uint64(v))
	n, err := unix.ProcessVMWritev(pid, []unix.Iovec{{Base: &b[0], Len: 8}},
		[]unix.RemoteIovec{{Base: uintptr(addr), Len: 8}}, 0)
	if err != nil || n != 8 {
		return unix.EFAULT
	}
	return nil
}
