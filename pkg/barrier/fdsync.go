package barrier

// Calls that could make a write durable on return without passing through
// the supervisor, from a fresh-context review: a duplicate of an O_SYNC
// file below SyncFDBase (GNU dd's oflag=dsync), a file or directory made
// synchronous (chattr +S, +D), and fallocate on an O_SYNC/O_DSYNC file.

import (
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"strings"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// takeCallerFD is takeFD for a call that must not go on unheld when the
// supervisor cannot see the descriptor, if it may be a durability point
// (sensitive). ok false: the call was answered. The kernel's own failures
// (no such descriptor, the caller gone) let the call run and fail there;
// any other (EPERM: a caller that made itself non-dumpable, seen by a
// `duet exec` without CAP_SYS_PTRACE) fails a sensitive call with EPERM
// rather than let a synchronous write through unheld. A call that is one
// only on an O_SYNC file duet placed is not sensitive while none was
// (installs.any): a write to a pipe numbered 512 ran before, and runs.
func takeCallerFD(listener int, req *seccompNotif, fd int, sensitive bool) (dup int, ok bool) {
	dup, err := takeFD(listener, req, fd)
	if err == nil {
		return dup, true
	}
	if kernelFails(err) || !sensitive {
		proceed(listener, req.ID)
		return -1, false
	}
	cannotLook(listener, req, err)
	return -1, false
}

// kernelFails says whether a failure to take a caller's descriptor or
// read its memory is one the kernel's own call meets too (EBADF, EFAULT),
// or the caller is gone (ESRCH; ENOENT: the notification no longer
// pending): letting the call run is then harmless.
func kernelFails(err error) bool {
	return errors.Is(err, unix.EBADF) || errors.Is(err, unix.EFAULT) || errors.Is(err, unix.ESRCH) || errors.Is(err, unix.ENOENT)
}

// cannotLook fails a call the supervisor cannot check, with EPERM and a
// warning naming why.
func cannotLook(listener int, req *seccompNotif, err error) {
	warnOnce(fmt.Sprintf("cannot read the descriptors or memory of pid %d (%s): %v; its calls that may be durability points fail with EPERM (a process that made itself non-dumpable needs a duet exec run as root)",
		req.PID, commOf(int(req.PID)), err))
	fail(listener, req.ID, unix.EPERM)
}

// readArg reads a call's argument from the caller's memory at addr into
// buf. false: the call was answered: let run where the kernel meets the
// same failure (EFAULT), failed closed where the supervisor alone cannot
// read (cannotLook).
func readArg(listener int, req *seccompNotif, addr uint64, buf []byte) bool {
	err := readMem(int(req.PID), addr, buf)
	switch {
	case err == nil:
		return true
	case kernelFails(err):
		proceed(listener, req.ID)
	default:
		cannotLook(listener, req, err)
	}
	return false
}

// commOf is a process's command name, for messages.
func commOf(pid int) string {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/comm", pid))
	if err != nil {
		return "?"
	}
	return strings.TrimSpace(string(b))
}

// dupSync handles dup, dup2, dup3 and fcntl's F_DUPFD and F_DUPFD_CLOEXEC
// of a descriptor of SyncFDBase or above. A duplicate of an O_SYNC/O_DSYNC
// file below SyncFDBase would take synchronous writes the filter lets
// through: the call fails with EPERM, said on stderr. GNU dd's oflag=dsync
// opens its output and dup2s it onto 1 (TestDupOfSyncFileBelowBaseRefused).
func dupSync(listener int, req *seccompNotif, sup supervisor) {
	src := int(int32(req.Args[0]))
	fd, ok := takeCallerFD(listener, req, src, sup.install.any.Load())
	if !ok {
		return
	}
	fl, err := unix.FcntlInt(uintptr(fd), unix.F_GETFL, 0)
	unix.Close(fd)
	if err != nil || fl&unix.O_DSYNC == 0 {
		proceed(listener, req.ID)
		return
	}
	switch req.NR {
	case unix.SYS_DUP2, unix.SYS_DUP3:
		if to := int32(req.Args[1]); to < 0 || to >= SyncFDBase {
			proceed(listener, req.ID) // EBADF from the kernel, or a number writes are held on
			return
		}
	case unix.SYS_FCNTL:
		if from := int32(req.Args[2]); from >= SyncFDBase {
			proceed(listener, req.ID) // the duplicate is at from or above
			return
		}
	}
	warnOnce(fmt.Sprintf("pid %d (%s) duplicated descriptor %d, a file opened with O_SYNC or O_DSYNC, onto a descriptor below %d, where its writes would return before the peer has them: the call fails with EPERM (GNU dd: use conv=fdatasync or conv=fsync rather than oflag=dsync or oflag=sync)",
		req.PID, commOf(int(req.PID)), src, SyncFDBase))
	fail(listener, req.ID, unix.EPERM)
}

// setflagsSync handles FS_IOC_SETFLAGS and FS_IOC_FSSETXATTR: flags that
// make a file's writes synchronous on every descriptor (FS_SYNC_FL,
// FS_XFLAG_SYNC; ext4 hands a directory's to the files made in it) or a
// directory's entry changes (FS_DIRSYNC_FL) are refused with EPERM: they
// would return durable before the peer has them.
func setflagsSync(listener int, req *seccompNotif) {
	var b [4]byte
	if !readArg(listener, req, req.Args[2], b[:]) {
		return
	}
	v := binary.LittleEndian.Uint32(b[:])
	bad := v&(fsSyncFL|fsDirsyncFL) != 0
	if uint32(req.Args[1]) == fsIocFssetxattr {
		bad = v&fsXflagSync != 0
	}
	if bad {
		refuseSyncFlag(listener, req)
		return
	}
	proceed(listener, req.ID)
}

// fileSetattrSync handles file_setattr(dfd, path, struct file_attr *,
// size, at_flags), whose first field is the FS_XFLAG_* flags.
func fileSetattrSync(listener int, req *seccompNotif) {
	var b [8]byte
	if req.Args[3] < uint64(len(b)) {
		proceed(listener, req.ID) // the kernel refuses the size
		return
	}
	if !readArg(listener, req, req.Args[2], b[:]) {
		return
	}
	if binary.LittleEndian.Uint64(b[:])&fsXflagSync != 0 {
		refuseSyncFlag(listener, req)
		return
	}
	proceed(listener, req.ID)
}

func refuseSyncFlag(listener int, req *seccompNotif) {
	warnOnce(fmt.Sprintf("pid %d (%s) asked to make a file or directory synchronous (chattr +S or +D): its writes would return durable before the peer has them; refused with EPERM (open the file with O_SYNC or O_DSYNC, or call fsync, which duet holds)",
		req.PID, commOf(int(req.PID))))
	fail(listener, req.ID, unix.EPERM)
}

// fallocateSync handles fallocate(fd, mode, offset, len) on a descriptor
// of SyncFDBase or above, and the preallocation ioctls (FS_IOC_RESVSP...,
// FS_IOC_ZERO_RANGE: fallocate by another door) on any. On an
// O_SYNC/O_DSYNC file ext4 and XFS make the change durable before the call
// returns, so the supervisor makes it on the caller's own open file, then
// holds the call for the barrier, as for a synchronous write. (The
// caller's RLIMIT_FSIZE does not apply, as for the writes.)
func fallocateSync(listener int, req *seccompNotif, sup supervisor, start time.Time) {
	fd, ok := takeCallerFD(listener, req, int(int32(req.Args[0])), sup.install.any.Load())
	if !ok {
		return
	}
	defer unix.Close(fd)
	fl, err := unix.FcntlInt(uintptr(fd), unix.F_GETFL, 0)
	if err != nil || fl&unix.O_DSYNC == 0 || fl&unix.O_ACCMODE == unix.O_RDONLY || fl&unix.O_PATH != 0 {
		proceed(listener, req.ID) // not a durability point, or the kernel's EBADF
		return
	}
	var st unix.Stat_t
	if unix.Fstat(fd, &st) != nil || st.Mode&unix.S_IFMT != unix.S_IFREG {
		proceed(listener, req.ID)
		return
	}
	pid := int(req.PID)
	// The ioctl's argument is read first, as the kernel does: an
	// unreadable one changes nothing.
	var sr [spaceResvSize]byte
	if req.NR == unix.SYS_IOCTL && !readArg(listener, req, req.Args[2], sr[:]) {
		return
	}
	// The kernel clears setuid and setgid bits for a caller without
	// CAP_FSETID (file_modified); the supervisor holds it.
	if err := killPrivs(fd, pid); err != nil {
		fail(listener, req.ID, asErrno(err))
		return
	}
	if req.NR == unix.SYS_IOCTL {
		if _, err := ioctlRet(fd, uintptr(uint32(req.Args[1])), unsafe.Pointer(&sr[0])); err != nil {
			fail(listener, req.ID, asErrno(err))
			return
		}
	} else if err := fallocateRetry(fd, uint32(req.Args[1]), int64(req.Args[2]), int64(req.Args[3])); err != nil {
		fail(listener, req.ID, asErrno(err))
		return
	}
	waited, err := sup.hold(req.NR)
	if err != nil {
		fmt.Fprintf(os.Stderr, "duet exec: fallocate of pid %d failed with EIO: %v\n", req.PID, err)
		fail(listener, req.ID, unix.EIO)
		return
	}
	sup.done(req.NR, start, waited, time.Since(start)-waited)
	reply(listener, &seccompNotifResp{ID: req.ID})
}

func fallocateRetry(fd int, mode uint32, off, length int64) error {
	for {
		err := unix.Fallocate(fd, mode, off, length)
		if err != unix.EINTR {
			return err
		}
	}
}
