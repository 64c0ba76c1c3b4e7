// Package barrier runs a command under a seccomp filter that stops its
// durability calls (fsync, fdatasync, sync_file_range, msync, syncfs, sync)
// until duet confirms that every change made so far is on the peer. eBPF
// cannot block a write; these calls are where an application learns that
// its data is durable, so that is where duet waits.
package barrier

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"os/signal"
	"runtime"
	"syscall"
	"unsafe"

	"golang.org/x/sys/unix"
)

// ChildCommand is the hidden CLI command the supervised child re-executes
// as: it installs the filter on its own thread and execs the target.
const ChildCommand = "__supervised-child"

// Durability calls stopped for the barrier (x86-64 numbers).
var trapped = []uint32{unix.SYS_FSYNC, unix.SYS_FDATASYNC, unix.SYS_SYNC_FILE_RANGE,
	unix.SYS_MSYNC, unix.SYS_SYNCFS, unix.SYS_SYNC}

// filter returns the seccomp program: durability calls go to the listener,
// io_uring_setup fails with ENOSYS (so programs fall back to syscalls the
// filter sees), a foreign architecture fails with ENOSYS, the rest runs.
func filter() []unix.SockFilter {
	const (
		ld  = unix.BPF_LD | unix.BPF_W | unix.BPF_ABS
		jeq = unix.BPF_JMP | unix.BPF_JEQ | unix.BPF_K
		ret = unix.BPF_RET | unix.BPF_K
	)
	n := uint8(len(trapped))
	f := []unix.SockFilter{
		{Code: ld, K: 4}, // arch
		{Code: jeq, K: unix.AUDIT_ARCH_X86_64, Jt: 1, Jf: 0},
		{Code: ret, K: unix.SECCOMP_RET_ERRNO | uint32(unix.ENOSYS)},
		{Code: ld, K: 0}, // syscall number
	}
	for i, nr := range trapped {
		// Jump to the USER_NOTIF return: past the remaining checks,
		// the io_uring check and the ALLOW.
		f = append(f, unix.SockFilter{Code: jeq, K: nr, Jt: n - uint8(i) - 1 + 2})
	}
	return append(f,
		unix.SockFilter{Code: jeq, K: unix.SYS_IO_URING_SETUP, Jt: 2},
		unix.SockFilter{Code: ret, K: unix.SECCOMP_RET_ALLOW},
		unix.SockFilter{Code: ret, K: unix.SECCOMP_RET_USER_NOTIF},
		unix.SockFilter{Code: ret, K: unix.SECCOMP_RET_ERRNO | uint32(unix.ENOSYS)},
	)
}

// RunChild is the child side: install the filter on this thread, send the
// listener to the parent on fd 3, exec args. It returns only on error.
func RunChild(args []string) error {
	if len(args) == 0 {
		return errors.New("no command to run")
	}
	path, err := exec.LookPath(args[0])
	if err != nil {
		return err
	}
	// The filter applies to this thread; execve from it keeps the filter
	// and ends the others.
	runtime.LockOSThread()
	if err := unix.Prctl(unix.PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0); err != nil {
		return fmt.Errorf("no_new_privs: %w", err)
	}
	prog := filter()
	fprog := unix.SockFprog{Len: uint16(len(prog)), Filter: &prog[0]}
	fd, _, errno := unix.Syscall(unix.SYS_SECCOMP, unix.SECCOMP_SET_MODE_FILTER,
		unix.SECCOMP_FILTER_FLAG_NEW_LISTENER, uintptr(unsafe.Pointer(&fprog)))
	if errno != 0 {
		return fmt.Errorf("installing seccomp filter: %w", errno)
	}
	if err := unix.Sendmsg(3, []byte{0}, unix.UnixRights(int(fd)), nil, 0); err != nil {
		return fmt.Errorf("handing the listener to the supervisor: %w", err)
	}
	unix.Close(int(fd))
	unix.Close(3)
	return unix.Exec(path, args, os.Environ())
}

// seccompNotif is struct seccomp_notif (80 bytes); x/sys lacks it.
type seccompNotif struct {
	ID    uint64
	PID   uint32
	Flags uint32
	NR    int32
	Arch  uint32
	IP    uint64
	Args  [6]uint64
}

// seccompNotifResp is struct seccomp_notif_resp (24 bytes).
type seccompNotifResp struct {
	ID    uint64
	Val   int64
	Error int32
	Flags uint32
}

// Func is the barrier: it returns nil once everything written so far is on
// the peer (or the peer is declared gone), an error when that cannot be
// confirmed; the call then fails with EIO rather than claim durability.
type Func func(nr int32) error

// Start starts args supervised and returns the running command. self is
// the duet binary; setup, if not nil, adjusts the command (standard
// streams, process group) before it starts.
func Start(self string, args []string, wait Func, setup func(*exec.Cmd)) (*exec.Cmd, error) {
	sp, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, err
	}
	parent := os.NewFile(uintptr(sp[0]), "supervisor")
	child := os.NewFile(uintptr(sp[1]), "supervised")
	defer parent.Close()
	cmd := exec.Command(self, append([]string{ChildCommand, "--"}, args...)...)
	if setup != nil {
		setup(cmd)
	}
	cmd.ExtraFiles = []*os.File{child} // fd 3
	if err := cmd.Start(); err != nil {
		child.Close()
		return nil, err
	}
	child.Close()
	listener, err := receiveFD(sp[0])
	if err != nil {
		// The child failed before exec and said why on stderr.
		cmd.Wait()
		return nil, fmt.Errorf("starting %s under supervision: %w", args[0], err)
	}
	go serve(listener, wait)
	return cmd, nil
}

// Exec runs args supervised with this process's standard streams and
// returns its exit status (128+signal when killed, as a shell does).
func Exec(ctx context.Context, self string, args []string, wait Func) (int, error) {
	cmd, err := Start(self, args, wait, func(c *exec.Cmd) {
		c.Stdin, c.Stdout, c.Stderr = os.Stdin, os.Stdout, os.Stderr
	})
	if err != nil {
		return 0, err
	}
	// Signals meant for the command reach it; duet exec itself stays.
	sigs := make(chan os.Signal, 4)
	signal.Notify(sigs, syscall.SIGINT, syscall.SIGTERM, syscall.SIGHUP, syscall.SIGQUIT)
	defer signal.Stop(sigs)
	go func() {
		for s := range sigs {
			cmd.Process.Signal(s)
		}
	}()
	return ExitCode(cmd.Wait())
}

// ExitCode turns cmd.Wait's error into a shell-style exit status.
func ExitCode(err error) (int, error) {
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		if ws, ok := ee.Sys().(syscall.WaitStatus); ok && ws.Signaled() {
			return 128 + int(ws.Signal()), nil
		}
		return ee.ExitCode(), nil
	}
	return 0, err
}

func receiveFD(sock int) (int, error) {
	buf := make([]byte, 1)
	oob := make([]byte, unix.CmsgSpace(4))
	_, oobn, _, _, err := unix.Recvmsg(sock, buf, oob, 0)
	if err != nil {
		return -1, err
	}
	msgs, err := unix.ParseSocketControlMessage(oob[:oobn])
	if err != nil || len(msgs) == 0 {
		return -1, errors.New("no listener received")
	}
	fds, err := unix.ParseUnixRights(&msgs[0])
	if err != nil || len(fds) == 0 {
		return -1, errors.New("no listener received")
	}
	return fds[0], nil
}

// serve answers notifications until the supervised processes are gone.
// Each call waits on its own: one thread's fsync does not hold another's.
func serve(listener int, wait Func) {
	defer unix.Close(listener)
	for {
		var req seccompNotif
		if err := ioctl(listener, unix.SECCOMP_IOCTL_NOTIF_RECV, unsafe.Pointer(&req)); err != nil {
			if errors.Is(err, unix.EINTR) || errors.Is(err, unix.ENOENT) {
				continue
			}
			return // ENOTCONN etc.: no process left with the filter
		}
		go func(req seccompNotif) {
			resp := seccompNotifResp{ID: req.ID}
			if err := wait(req.NR); err != nil {
				resp.Error = -int32(unix.EIO)
				fmt.Fprintf(os.Stderr, "duet exec: durability call %d of pid %d failed with EIO: %v\n", req.NR, req.PID, err)
			} else {
				resp.Flags = unix.SECCOMP_USER_NOTIF_FLAG_CONTINUE
			}
			ioctl(listener, unix.SECCOMP_IOCTL_NOTIF_SEND, unsafe.Pointer(&resp))
		}(req)
	}
}

func ioctl(fd int, req uintptr, arg unsafe.Pointer) error {
	_, _, errno := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), req, uintptr(arg))
	if errno != 0 {
		return errno
	}
	return nil
}
