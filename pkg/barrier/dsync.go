package barrier

// Writes to files opened with O_SYNC or O_DSYNC (and pwritev2 with
// RWF_SYNC or RWF_DSYNC) are durability points: the program learns that
// the data is durable when write(2) returns. The filter sends such opens
// to the supervisor, which opens the file itself with the caller's
// credentials, umask and root, and installs the descriptor in the caller
// at a number of SyncFDBase or above. Writes on those numbers come to the
// supervisor too: it performs a write on a synchronous file itself (on
// the caller's own open file description, so offset and O_APPEND are
// shared), waits for the barrier, then returns the write's result.

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"runtime"
	"strconv"
	"strings"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// seccompNotifAddfd is struct seccomp_notif_addfd (24 bytes).
type seccompNotifAddfd struct {
	ID         uint64
	Flags      uint32
	Srcfd      uint32
	Newfd      uint32
	NewfdFlags uint32
}

// maxEmulatedWrite bounds the bytes one emulated write carries; a longer
// one is a short write, which the program's write loop continues.
const maxEmulatedWrite = 64 << 20

func reply(listener int, resp *seccompNotifResp) {
	ioctl(listener, unix.SECCOMP_IOCTL_NOTIF_SEND, unsafe.Pointer(resp))
}

func proceed(listener int, id uint64) {
	reply(listener, &seccompNotifResp{ID: id, Flags: unix.SECCOMP_USER_NOTIF_FLAG_CONTINUE})
}

func fail(listener int, id uint64, errno unix.Errno) {
	reply(listener, &seccompNotifResp{ID: id, Error: -int32(errno)})
}

func asErrno(err error) unix.Errno {
	var errno unix.Errno
	if errors.As(err, &errno) {
		return errno
	}
	return unix.EIO
}

// openSync handles open, openat and openat2 with O_SYNC or O_DSYNC.
func openSync(listener int, req *seccompNotif, installMu *installs) {
	dirfd := int32(unix.AT_FDCWD)
	var pathAddr, flags, mode uint64
	switch req.NR {
	case unix.SYS_OPEN:
		pathAddr, flags, mode = req.Args[0], req.Args[1], req.Args[2]
	case unix.SYS_OPENAT:
		dirfd, pathAddr, flags, mode = int32(req.Args[0]), req.Args[1], req.Args[2], req.Args[3]
	case unix.SYS_OPENAT2:
		dirfd, pathAddr = int32(req.Args[0]), req.Args[1]
		var how [24]byte // struct open_how: flags, mode, resolve
		if req.Args[3] < uint64(len(how)) {
			proceed(listener, req.ID) // the kernel reports the bad argument
			return
		}
		if err := readMem(int(req.PID), req.Args[2], how[:]); err != nil {
			if kernelFails(err) {
				proceed(listener, req.ID) // the kernel reports the bad argument
			} else {
				cannotLook(listener, req, err) // it may ask for O_DSYNC
			}
			return
		}
		flags, mode = binary.LittleEndian.Uint64(how[0:]), binary.LittleEndian.Uint64(how[8:])
		if binary.LittleEndian.Uint64(how[16:]) != 0 && flags&unix.O_DSYNC != 0 {
			// RESOLVE_* restrictions are not reproduced: run it as
			// asked; its writes are replicated asynchronously.
			warnOnce("openat2 with RESOLVE flags and O_SYNC/O_DSYNC: writes through it are not held for the peer")
		}
		if flags&unix.O_DSYNC == 0 || binary.LittleEndian.Uint64(how[16:]) != 0 {
			proceed(listener, req.ID)
			return
		}
	}
	if flags&unix.O_PATH != 0 {
		proceed(listener, req.ID)
		return
	}
	pid := int(req.PID)
	path, err := readString(pid, pathAddr)
	if err != nil {
		fail(listener, req.ID, asErrno(err))
		return
	}
	if path == "" {
		fail(listener, req.ID, unix.ENOENT)
		return
	}
	// Resolve as the caller would: from its root (which also scopes its
	// absolute symlinks and ".."), its working directory, or the
	// directory its descriptor names.
	var base string
	inRoot := false
	switch {
	case strings.HasPrefix(path, "/"):
		base, inRoot = fmt.Sprintf("/proc/%d/root", pid), true
	case dirfd == unix.AT_FDCWD:
		base = fmt.Sprintf("/proc/%d/cwd", pid)
	default:
		d, err := takeFD(listener, req, int(dirfd))
		if err != nil {
			fail(listener, req.ID, unix.EBADF)
			return
		}
		unix.Close(d)
		base = fmt.Sprintf("/proc/%d/fd/%d", pid, dirfd)
	}
	if c, err := credsOf(pid); err == nil && c.uid == 0 && !asPrivilegedAs(pid) {
		// openAs opens as root with the supervisor's capabilities: a
		// root caller with fewer would get what the kernel refuses it.
		warnOnce("O_SYNC/O_DSYNC open by root with reduced capabilities (or in a user namespace): writes through it are not held for the peer")
		proceed(listener, req.ID)
		return
	}
	fd, err := openAs(pid, base, path, inRoot, flags, mode)
	if errors.Is(err, unix.EAGAIN) {
		warnOnce("O_SYNC/O_DSYNC open whose path kept moving while it was resolved (EAGAIN): writes through it are not held for the peer")
		proceed(listener, req.ID)
		return
	}
	if errors.Is(err, unix.ELOOP) {
		// A /proc magic link on the way (/dev/stdout, /dev/fd/N,
		// /proc/self/fd/N): opened here, "self" is the supervisor, and
		// the caller got the supervisor's file (a review:
		// TestSyncOpenThroughProcSelfOpensCallersFile). Or a loop, or
		// O_NOFOLLOW on a symlink: the kernel answers those alike.
		warnOnce("O_SYNC/O_DSYNC open through a /proc magic link (/dev/stdout, /dev/fd/N, /proc/self/fd/N): writes through it are not held for the peer")
		proceed(listener, req.ID)
		return
	}
	if err != nil {
		fail(listener, req.ID, asErrno(err))
		return
	}
	installAndAnswer(listener, req, installMu, fd, flags&unix.O_CLOEXEC != 0)
}

// installAndAnswer installs fd, which it closes, in the caller of req and
// answers the open with its number, or with the install's error.
func installAndAnswer(listener int, req *seccompNotif, installMu *installs, fd int, cloexec bool) {
	defer unix.Close(fd)
	n, err := install(listener, req, installMu, fd, cloexec)
	if err != nil {
		fail(listener, req.ID, asErrno(err))
		return
	}
	reply(listener, &seccompNotifResp{ID: req.ID, Val: int64(n)})
}

// install puts fd into the caller of req, at the highest free number from
// SyncFDBase up, and returns that number; the caller's call is answered
// after (not with SECCOMP_ADDFD_FLAG_SEND: the kernel marks the call
// answered, with 0, before it waits for the caller to take the file, and
// a signal in that wait withdrew the file and left open(2) returning 0).
//
// installMu, one per listener (processes that share a descriptor table
// share a filter, hence a listener), serialises picking the number and
// installing the file: two O_SYNC opens at once (two threads of a
// service) picked the same number, and SETFD put the second file in place
// of the first. A number the program itself takes (dup2) between the pick
// and the install is replaced all the same: the kernel has no "lowest
// free from N up" for ADDFD. Programs rarely use the top of their range.
func install(listener int, req *seccompNotif, installMu *installs, fd int, cloexec bool) (int, error) {
	add := seccompNotifAddfd{ID: req.ID, Srcfd: uint32(fd)}
	if cloexec {
		add.NewfdFlags = unix.O_CLOEXEC
	}
	installMu.Lock()
	defer installMu.Unlock()
	installMu.any.Store(true) // before the file is there
	if n, ok := freeSyncFD(int(req.PID)); ok {
		add.Flags = unix.SECCOMP_ADDFD_FLAG_SETFD
		add.Newfd = uint32(n)
		got, err := ioctlRet(listener, unix.SECCOMP_IOCTL_NOTIF_ADDFD, unsafe.Pointer(&add))
		if err == nil || errors.Is(err, unix.ENOENT) || errors.Is(err, unix.ESRCH) {
			return got, err // ENOENT, ESRCH: the caller is gone
		}
		add.Flags, add.Newfd = 0, 0
	}
	if _, err := os.Stat(fmt.Sprintf("/proc/%d/fd", req.PID)); err != nil {
		return 0, unix.ESRCH // the caller is gone
	}
	// No room at SyncFDBase or above (a low descriptor limit): the file
	// is opened all the same, at the number the kernel picks.
	warnOnce(fmt.Sprintf("no descriptor number from %d up is free in pid %d: writes to its O_SYNC/O_DSYNC files are not held for the peer (raise its RLIMIT_NOFILE)", SyncFDBase, req.PID))
	return ioctlRet(listener, unix.SECCOMP_IOCTL_NOTIF_ADDFD, unsafe.Pointer(&add))
}

// freeSyncFD returns the highest free descriptor number of pid from
// SyncFDBase up, under its descriptor limit. The top numbers are almost
// always free: each is looked up on its own (a program with 19,000
// descriptors took 22-39 ms to list, with the install lock held), and the
// whole table is read only when the first few are taken.
func freeSyncFD(pid int) (int, bool) {
	limit, err := openFilesLimit(pid)
	if err != nil {
		return 0, false
	}
	top := min(limit, 1<<20)
	dir := fmt.Sprintf("/proc/%d/fd/", pid)
	for n := top - 1; n >= SyncFDBase && n >= top-8; n-- {
		var st unix.Stat_t
		switch err := unix.Lstat(dir+strconv.Itoa(n), &st); {
		case errors.Is(err, unix.ENOENT):
			if _, derr := os.Stat(dir); derr != nil {
				return 0, false // the process is gone
			}
			return n, true
		case err != nil:
			return 0, false
		}
	}
	ents, err := os.ReadDir(dir)
	if err != nil {
		return 0, false
	}
	used := map[int]bool{}
	for _, e := range ents {
		if n, err := strconv.Atoi(e.Name()); err == nil {
			used[n] = true
		}
	}
	for n := top - 1; n >= SyncFDBase; n-- {
		if !used[n] {
			return n, true
		}
	}
	return 0, false
}

// openFilesLimit reads pid's soft RLIMIT_NOFILE from /proc/PID/limits
// (prlimit(2) on another user's process needs CAP_SYS_RESOURCE, which a
// container's root may lack).
func openFilesLimit(pid int) (int, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/limits", pid))
	if err != nil {
		return 0, err
	}
	for _, line := range strings.Split(string(b), "\n") {
		if rest, ok := strings.CutPrefix(line, "Max open files"); ok {
			f := strings.Fields(rest)
			if len(f) > 0 {
				if f[0] == "unlimited" {
					return 1 << 20, nil
				}
				return strconv.Atoi(f[0])
			}
		}
	}
	return 0, fmt.Errorf("/proc/%d/limits: no open files line", pid)
}

// creds are what the kernel checks when a process opens a file.
type creds struct {
	uid, gid int
	groups   []uint32
	umask    int
}

func credsOf(pid int) (creds, error) {
	c := creds{umask: 0o022}
	f, err := os.Open(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return c, err
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		k, v, _ := strings.Cut(sc.Text(), ":")
		fs := strings.Fields(v)
		switch k {
		case "Uid", "Gid":
			if len(fs) < 4 {
				return c, fmt.Errorf("/proc/%d/status: bad %s line", pid, k)
			}
			n, err := strconv.Atoi(fs[3]) // the filesystem id
			if err != nil {
				return c, err
			}
			if k == "Uid" {
				c.uid = n
			} else {
				c.gid = n
			}
		case "Groups":
			for _, g := range fs {
				n, err := strconv.ParseUint(g, 10, 32)
				if err != nil {
					return c, err
				}
				c.groups = append(c.groups, uint32(n))
			}
		case "Umask":
			if len(fs) == 1 {
				n, err := strconv.ParseUint(fs[0], 8, 32)
				if err != nil {
					return c, err
				}
				c.umask = int(n)
			}
		}
	}
	return c, sc.Err()
}

// openFlags are the flags open(2) knows (the kernel's VALID_OPEN_FLAGS):
// it ignores others, which openat2 refuses.
const openFlags = unix.O_ACCMODE | unix.O_CREAT | unix.O_EXCL | unix.O_NOCTTY | unix.O_TRUNC |
	unix.O_APPEND | unix.O_NONBLOCK | unix.O_SYNC | unix.O_DSYNC | unix.O_ASYNC | unix.O_DIRECT |
	unix.O_LARGEFILE | unix.O_DIRECTORY | unix.O_NOFOLLOW | unix.O_NOATIME | unix.O_CLOEXEC |
	unix.O_PATH | unix.O_TMPFILE

// openAs opens path from base (a directory of pid's under /proc: its root,
// which scopes path's resolution when inRoot, its working directory or a
// descriptor's directory) with pid's filesystem credentials and umask,
// and no /proc magic link on the way past base (ELOOP), on a thread of its
// own: the thread's credentials and umask are changed, and it is never
// returned to the Go scheduler (it ends with the goroutine).
func openAs(pid int, base, path string, inRoot bool, flags, mode uint64) (int, error) {
	how := unix.OpenHow{Flags: flags&openFlags | unix.O_CLOEXEC, Resolve: unix.RESOLVE_NO_MAGICLINKS}
	// (O_TMPFILE includes O_DIRECTORY: a directory's open takes no mode.)
	if flags&unix.O_CREAT != 0 || flags&unix.O_TMPFILE == unix.O_TMPFILE {
		how.Mode = mode & 0o7777 // open(2) ignores the rest; openat2 refuses it
	}
	if inRoot {
		how.Resolve |= unix.RESOLVE_IN_ROOT
	}
	c, err := credsOf(pid)
	if err != nil {
		return -1, err
	}
	type result struct {
		fd  int
		err error
	}
	done := make(chan result, 1)
	var open func()
	open = func() {
		runtime.LockOSThread() // not unlocked: the thread exits after this
		if unix.Gettid() == unix.Getpid() {
			// The process's main thread: a goroutine that exits locked
			// to it does not end it (the runtime parks it), and it kept
			// the caller's filesystem credentials, which
			// /proc/<pid>/status shows as the process's
			// (TestOpenAsLeavesMainThreadAlone). Another goroutine
			// opens; this one keeps the main thread for good, so that
			// no later one lands there.
			go open()
			select {}
		}
		if err := unix.Unshare(unix.CLONE_FS); err != nil {
			done <- result{-1, fmt.Errorf("unshare: %w", err)}
			return
		}
		unix.Umask(c.umask)
		if c.uid != 0 || c.gid != 0 || len(c.groups) > 0 {
			var gp unsafe.Pointer
			if len(c.groups) > 0 {
				gp = unsafe.Pointer(&c.groups[0])
			}
			// Raw calls: these change this thread only.
			if _, _, e := unix.RawSyscall(unix.SYS_SETGROUPS, uintptr(len(c.groups)), uintptr(gp), 0); e != 0 {
				done <- result{-1, e}
				return
			}
			unix.RawSyscall(unix.SYS_SETFSGID, uintptr(c.gid), 0, 0)
			// Last: a non-zero fsuid drops the filesystem capabilities.
			unix.RawSyscall(unix.SYS_SETFSUID, uintptr(c.uid), 0, 0)
		}
		// base is a magic link itself, followed as the caller's.
		dir, err := unix.Open(base, unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
		if err != nil {
			done <- result{-1, err}
			return
		}
		// A scoped lookup (RESOLVE_IN_ROOT) through ".." fails with
		// EAGAIN when a rename or a mount ran anywhere meanwhile: tried
		// again, then left to the kernel as for a magic link (a review).
		fd, err := unix.Openat2(dir, path, &how)
		for try := 0; errors.Is(err, unix.EAGAIN) && try < 8; try++ {
			fd, err = unix.Openat2(dir, path, &how)
		}
		unix.Close(dir)
		done <- result{fd, err}
	}
	go open()
	r := <-done
	return r.fd, r.err
}

// writeSync handles a write on a descriptor of SyncFDBase or above, or a
// pwritev2 with RWF_SYNC/RWF_DSYNC.
func writeSync(listener int, req *seccompNotif, sup supervisor, start time.Time) {
	// pwritev2's RWF_SYNC/RWF_DSYNC is a durability point on any file.
	rwfSync := req.NR == unix.SYS_PWRITEV2 && int(req.Args[5])&(unix.RWF_DSYNC|unix.RWF_SYNC) != 0
	fd, ok := takeCallerFD(listener, req, int(int32(req.Args[0])), rwfSync || sup.install.any.Load())
	if !ok {
		return
	}
	defer unix.Close(fd)
	fl, err := unix.FcntlInt(uintptr(fd), unix.F_GETFL, 0)
	rwf := 0
	if req.NR == unix.SYS_PWRITEV2 {
		rwf = int(req.Args[5])
	}
	if err != nil || fl&unix.O_DSYNC == 0 && rwf&(unix.RWF_DSYNC|unix.RWF_SYNC) == 0 {
		proceed(listener, req.ID) // not a durability point
		return
	}
	if fl&unix.O_ACCMODE == unix.O_RDONLY {
		proceed(listener, req.ID) // EBADF, from the kernel
		return
	}
	pid := int(req.PID)
	var iov []unix.RemoteIovec
	switch req.NR {
	case unix.SYS_WRITE, unix.SYS_PWRITE64:
		iov = []unix.RemoteIovec{{Base: uintptr(req.Args[1]), Len: int(min(req.Args[2], maxEmulatedWrite))}}
	default:
		if iov, err = readIovecs(pid, req.Args[1], req.Args[2]); err != nil {
			fail(listener, req.ID, asErrno(err))
			return
		}
	}
	data, err := gather(pid, iov)
	if err != nil {
		fail(listener, req.ID, asErrno(err))
		return
	}
	if len(data) > 0 {
		if err := killPrivs(fd, pid); err != nil {
			fail(listener, req.ID, asErrno(err))
			return
		}
	}
	var n int
	switch req.NR {
	case unix.SYS_WRITE, unix.SYS_WRITEV:
		n, err = unix.Write(fd, data)
	case unix.SYS_PWRITE64, unix.SYS_PWRITEV:
		n, err = unix.Pwrite(fd, data, int64(req.Args[3]))
	case unix.SYS_PWRITEV2:
		n, err = unix.Pwritev2(fd, [][]byte{data}, int64(req.Args[3]), rwf)
	}
	if err != nil {
		fail(listener, req.ID, asErrno(err))
		return
	}
	var waited time.Duration
	if n > 0 {
		if waited, err = sup.hold(req.NR); err != nil {
			fmt.Fprintf(os.Stderr, "duet exec: synchronous write of pid %d failed with EIO: %v\n", req.PID, err)
			fail(listener, req.ID, unix.EIO)
			return
		}
	}
	// The emulated write itself is the local part (O_DSYNC: it flushes).
	// Reported before the answer, as in answer.
	sup.done(req.NR, start, waited, time.Since(start)-waited)
	reply(listener, &seccompNotifResp{ID: req.ID, Val: int64(n)})
}

// readIovecs reads a struct iovec array from the caller's memory.
func readIovecs(pid int, addr, count uint64) ([]unix.RemoteIovec, error) {
	if count > 1024 { // UIO_MAXIOV
		return nil, unix.EINVAL
	}
	raw := make([]byte, 16*count)
	if err := readMem(pid, addr, raw); err != nil {
		return nil, err
	}
	var iov []unix.RemoteIovec
	total := 0
	for i := uint64(0); i < count && total < maxEmulatedWrite; i++ {
		base := binary.LittleEndian.Uint64(raw[16*i:])
		l := int(min(binary.LittleEndian.Uint64(raw[16*i+8:]), uint64(maxEmulatedWrite-total)))
		if l > 0 {
			iov = append(iov, unix.RemoteIovec{Base: uintptr(base), Len: l})
			total += l
		}
	}
	return iov, nil
}

// gather copies the caller's buffers. Like write(2), it stops at the
// first unreadable byte, and fails with EFAULT only if none was readable.
func gather(pid int, iov []unix.RemoteIovec) ([]byte, error) {
	var out []byte
	for _, v := range iov {
		buf := make([]byte, v.Len)
		n, err := unix.ProcessVMReadv(pid, []unix.Iovec{{Base: &buf[0], Len: uint64(len(buf))}}, []unix.RemoteIovec{v}, 0)
		if n > 0 {
			out = append(out, buf[:n]...)
		}
		if err != nil && !errors.Is(err, unix.EFAULT) {
			return nil, err // not readable by the supervisor (EPERM)
		}
		if err != nil || n < v.Len {
			if len(out) == 0 {
				return nil, unix.EFAULT
			}
			break
		}
	}
	return out, nil
}

// readMem reads the caller's memory: EFAULT where the kernel would meet
// it, or the error that kept the supervisor from reading (EPERM: see
// takeCallerFD).
func readMem(pid int, addr uint64, buf []byte) error {
	n, err := unix.ProcessVMReadv(pid, []unix.Iovec{{Base: &buf[0], Len: uint64(len(buf))}},
		[]unix.RemoteIovec{{Base: uintptr(addr), Len: len(buf)}}, 0)
	if err != nil && !errors.Is(err, unix.EFAULT) {
		return err
	}
	if err != nil || n != len(buf) {
		return unix.EFAULT
	}
	return nil
}

// readString reads a NUL-terminated path (PATH_MAX at most), a page at a
// time so that a string ending near unmapped memory still reads.
func readString(pid int, addr uint64) (string, error) {
	var out []byte
	for len(out) < unix.PathMax {
		chunk := 4096 - int(addr%4096)
		buf := make([]byte, chunk)
		if err := readMem(pid, addr, buf); err != nil {
			return "", err
		}
		if i := strings.IndexByte(string(buf), 0); i >= 0 {
			return string(append(out, buf[:i]...)), nil
		}
		out = append(out, buf...)
		addr += uint64(chunk)
	}
	return "", unix.ENAMETOOLONG
}

var warned = map[string]bool{}
var warnedMu = make(chan struct{}, 1)

// warnOnce tells the operator, once per message, about a write that is
// not held for the peer.
func warnOnce(msg string) {
	warnedMu <- struct{}{}
	defer func() { <-warnedMu }()
	if !warned[msg] {
		warned[msg] = true
		fmt.Fprintln(os.Stderr, "duet exec: warning:", msg)
	}
}

func ioctlRet(fd int, req uintptr, arg unsafe.Pointer) (int, error) {
	for {
		r, _, errno := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), req, uintptr(arg))
		switch errno {
		case 0:
			return int(r), nil
		case unix.EINTR:
			continue // see ioctl
		}
		return -1, errno
	}
}

// maxHandleSize is MAX_HANDLE_SZ: the kernel refuses larger handles.
const maxHandleSize = 128

// capDACReadSearch is CAP_DAC_READ_SEARCH's bit: open_by_handle_at needs
// it.
const capDACReadSearch = 2

// openByHandleSync handles open_by_handle_at(mount_fd, handle, flags) with
// O_SYNC or O_DSYNC (a userspace file server's open): like openSync, the
// supervisor opens the file itself and installs it at SyncFDBase or above,
// where its writes are held. Only for a caller whose filesystem user is
// root and that holds every capability the supervisor holds, in its user
// namespace (asPrivilegedAs): the supervisor's open then passes no check
// the kernel would have refused the caller. Without CAP_DAC_READ_SEARCH
// the kernel refuses the call, and the call is let through to do so. Any
// other caller's open goes through as it is, with a warning: its writes
// are replicated asynchronously.
func openByHandleSync(listener int, req *seccompNotif, installMu *installs) {
	flags := int(int32(req.Args[2]))
	if flags&unix.O_DSYNC == 0 || flags&unix.O_PATH != 0 {
		proceed(listener, req.ID)
		return
	}
	pid := int(req.PID)
	c, err := credsOf(pid)
	if err != nil {
		proceed(listener, req.ID)
		return
	}
	caps, _, err := callerCaps(pid)
	if err != nil || caps&(1<<capDACReadSearch) == 0 {
		proceed(listener, req.ID) // EPERM, from the kernel
		return
	}
	if c.uid != 0 || !asPrivilegedAs(pid) {
		warnOnce("open_by_handle_at with O_SYNC/O_DSYNC by a user other than root, or by root with reduced capabilities: writes through it are not held for the peer")
		proceed(listener, req.ID)
		return
	}
	var hdr [8]byte // struct file_handle: handle_bytes, handle_type, then the handle
	if err := readMem(pid, req.Args[1], hdr[:]); err != nil {
		proceed(listener, req.ID) // EFAULT, from the kernel
		return
	}
	size := binary.LittleEndian.Uint32(hdr[0:])
	if size == 0 || size > maxHandleSize {
		proceed(listener, req.ID) // EINVAL, from the kernel
		return
	}
	handle := make([]byte, size)
	if err := readMem(pid, req.Args[1]+8, handle); err != nil {
		proceed(listener, req.ID)
		return
	}
	var mount int
	if mfd := int32(req.Args[0]); mfd == unix.AT_FDCWD {
		if mount, err = unix.Open(fmt.Sprintf("/proc/%d/cwd", pid), unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0); err != nil {
			proceed(listener, req.ID)
			return
		}
	} else if mount, err = takeFD(listener, req, int(mfd)); err != nil {
		proceed(listener, req.ID) // EBADF, from the kernel
		return
	}
	fd, err := unix.OpenByHandleAt(mount, unix.NewFileHandle(int32(binary.LittleEndian.Uint32(hdr[4:])), handle), flags|unix.O_CLOEXEC)
	unix.Close(mount)
	if err != nil {
		fail(listener, req.ID, asErrno(err))
		return
	}
	installAndAnswer(listener, req, installMu, fd, flags&unix.O_CLOEXEC != 0)
}
