// Package barrier runs a command under a seccomp filter that stops its
// durability calls (fsync, fdatasync, sync_file_range, msync, syncfs, sync,
// synchronous writes, and their Linux AIO forms) until duet confirms that
// every change made so far is on the peer. eBPF cannot block a write;
// these calls are where an application learns that its data is durable,
// so that is where duet waits.
package barrier

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"os/signal"
	"runtime"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
	"unsafe"

	"github.com/duet-ha/duet/pkg/aiosync"
	"golang.org/x/sys/unix"
)

// ChildCommand is the hidden CLI command the supervised child re-executes
// as: it installs the filter on its own thread and execs the target.
const ChildCommand = "__supervised-child"

// Durability calls stopped for the barrier (x86-64 numbers).
var trapped = []uint32{unix.SYS_FSYNC, unix.SYS_FDATASYNC, unix.SYS_SYNC_FILE_RANGE,
	unix.SYS_MSYNC, unix.SYS_SYNCFS, unix.SYS_SYNC}

// Writes that may be durability points: on a descriptor of SyncFDBase or
// above (where duet places the files a supervised process opens with
// O_SYNC or O_DSYNC), or with RWF_SYNC/RWF_DSYNC (pwritev2).
var writes = []uint32{unix.SYS_WRITE, unix.SYS_PWRITE64, unix.SYS_WRITEV, unix.SYS_PWRITEV, unix.SYS_PWRITEV2}

// Copies the kernel makes into a file, synchronous into an O_SYNC/O_DSYNC
// one like write(2): sendfile's destination is its first argument,
// copy_file_range's and splice's their third.
var copiesArg0 = []uint32{unix.SYS_SENDFILE}
var copiesArg2 = []uint32{unix.SYS_COPY_FILE_RANGE, unix.SYS_SPLICE}

// Duplications of a descriptor of SyncFDBase or above (and fcntl's
// F_DUPFD, F_DUPFD_CLOEXEC): a duplicate of an O_SYNC/O_DSYNC file below
// SyncFDBase would take writes the filter lets through (GNU dd's
// oflag=dsync: open, then dup2 onto 1). The supervisor refuses those
// (dupSync).
var dups = []uint32{unix.SYS_DUP, unix.SYS_DUP2, unix.SYS_DUP3}

// file_setattr(2) (Linux 6.17) sets a file's flags as FS_IOC_FSSETXATTR
// does: the supervisor looks at them (fileSetattrSync).
const sysFileSetattr = unix.SYS_FILE_SETATTR

// ioctls the supervisor looks at: btrfs's BTRFS_IOC_SYNC (a syncfs: held
// as one), and the flag setters, which may make a file or directory
// synchronous (chattr +S, +D: its writes or entry changes durable on
// return, on any descriptor; refused, flagsSync).
const (
	btrfsIocSync    = 0x9408     // _IO(0x94, 8)
	fsIocSetflags   = 0x40086602 // FS_IOC_SETFLAGS
	fsIocSetflags32 = 0x40046602 // FS_IOC32_SETFLAGS
	fsIocFssetxattr = 0x401c5820 // FS_IOC_FSSETXATTR
	fsSyncFL        = 0x00000008 // FS_SYNC_FL
	fsDirsyncFL     = 0x00010000 // FS_DIRSYNC_FL
	fsXflagSync     = 0x00000020 // FS_XFLAG_SYNC
)

// fsIocFsgetxattr is FS_IOC_FSGETXATTR (tests).
const fsIocFsgetxattr = 0x801c581f

// The preallocation ioctls (vfs_fallocate through ioctl_preallocate: as
// durable on return on an O_DSYNC file as fallocate; fallocateSync), and
// btrfs's BTRFS_IOC_WAIT_SYNC, which waits for the commit
// BTRFS_IOC_START_SYNC began (held as a syncfs).
const (
	fsIocResvsp      = 0x40305828 // _IOW('X', 40, struct space_resv)
	fsIocUnresvsp    = 0x40305829
	fsIocResvsp64    = 0x4030582a
	fsIocUnresvsp64  = 0x4030582b
	fsIocZeroRange   = 0x40305839
	btrfsIocWaitSync = 0x40089416 // _IOW(0x94, 22, __u64)
	// Ioctls that sync a whole filesystem before they return (root
	// only): FIFREEZE (fsfreeze, snapshot tools), ext4's journal
	// checkpoint, and a shutdown (its default mode syncs first). Held as
	// a syncfs (a review; TestFilterDecisions).
	fiFreeze          = 0xc0045877 // _IOWR('X', 119, int)
	ext4IocCheckpoint = 0x4004662b // _IOW('f', 43, __u32)
	fsIocShutdown     = 0x8004587d // _IOR('X', 125, __u32)
	spaceResvSize     = 48         // struct space_resv
)

var ioctlsTrapped = []uint32{btrfsIocSync, btrfsIocWaitSync, fiFreeze, ext4IocCheckpoint, fsIocShutdown, fsIocSetflags, fsIocSetflags32, fsIocFssetxattr,
	fsIocResvsp, fsIocUnresvsp, fsIocResvsp64, fsIocUnresvsp64, fsIocZeroRange}

// SyncFDBase is the lowest descriptor number duet gives a file opened with
// O_SYNC or O_DSYNC by a supervised process; writes on descriptors from it
// up go to the supervisor, which performs those on synchronous files and
// waits for the peer before returning. Files are placed from the top of
// the process's descriptor limit down, far from the numbers the kernel
// hands out (lowest free first).
const SyncFDBase = 512

// seccomp_data offsets.
const (
	offNR   = 0
	offArch = 4
)

func argLow(i int) uint32 { return 16 + 8*uint32(i) }

// asm assembles a classic BPF program whose jumps name labels.
type asm struct {
	ins    []unix.SockFilter
	jt, jf []string // label of each instruction's jumps ("" = next)
	labels map[string]int
}

func (a *asm) label(name string) { a.labels[name] = len(a.ins) }

func (a *asm) op(code uint16, k uint32, jt, jf string) {
	a.ins = append(a.ins, unix.SockFilter{Code: code, K: k})
	a.jt, a.jf = append(a.jt, jt), append(a.jf, jf)
}

func (a *asm) load(off uint32) { a.op(unix.BPF_LD|unix.BPF_W|unix.BPF_ABS, off, "", "") }
func (a *asm) ret(v uint32)    { a.op(unix.BPF_RET|unix.BPF_K, v, "", "") }
func (a *asm) jeq(k uint32, jt, jf string) {
	a.op(unix.BPF_JMP|unix.BPF_JEQ|unix.BPF_K, k, jt, jf)
}
func (a *asm) jset(k uint32, jt, jf string) {
	a.op(unix.BPF_JMP|unix.BPF_JSET|unix.BPF_K, k, jt, jf)
}
func (a *asm) jge(k uint32, jt, jf string) {
	a.op(unix.BPF_JMP|unix.BPF_JGE|unix.BPF_K, k, jt, jf)
}

func (a *asm) program() []unix.SockFilter {
	out := append([]unix.SockFilter(nil), a.ins...)
	rel := func(i int, l string) uint8 {
		if l == "" {
			return 0
		}
		t, ok := a.labels[l]
		if !ok || t <= i || t-i-1 > 255 {
			panic("seccomp filter: bad jump to " + l)
		}
		return uint8(t - i - 1)
	}
	for i := range out {
		out[i].Jt, out[i].Jf = rel(i, a.jt[i]), rel(i, a.jf[i])
	}
	return out
}

// x32SyscallBit is __X32_SYSCALL_BIT: an x86-64 process may make x32
// calls (same architecture in seccomp_data, numbers with this bit set).
const x32SyscallBit = 0x40000000

// filter returns the seccomp program: durability calls, opens with
// O_SYNC/O_DSYNC, writes that may be synchronous and io_submit (whose
// requests may be flushes or synchronous writes) go to the listener; the
// rest runs. Some calls fail with ENOSYS, as on a kernel without them, so
// that programs fall back to calls the filter sees: io_uring_setup
// (io_uring's reads, writes and fsyncs never pass through here), every
// x32 call (its numbers are not the ones matched below) and a foreign
// architecture (i386's int 0x80). preadv2's RWF_SYNC/RWF_DSYNC mean
// nothing for a read and are not held.
func filter() []unix.SockFilter {
	a := &asm{labels: map[string]int{}}
	a.load(offArch)
	a.jeq(unix.AUDIT_ARCH_X86_64, "", "enosys")
	a.load(offNR)
	a.jge(x32SyscallBit, "enosys", "")
	for _, nr := range trapped {
		a.jeq(nr, "notify", "")
	}
	a.jeq(unix.SYS_IO_URING_SETUP, "enosys", "")
	a.jeq(unix.SYS_IO_SUBMIT, "notify", "")
	a.jeq(unix.SYS_OPEN, "flags1", "")
	a.jeq(unix.SYS_OPENAT, "flags2", "")
	a.jeq(unix.SYS_OPEN_BY_HANDLE_AT, "flags2", "")
	a.jeq(unix.SYS_OPENAT2, "notify", "") // flags in memory: the supervisor looks
	a.jeq(unix.SYS_PWRITEV2, "rwf", "")
	for _, nr := range writes {
		a.jeq(nr, "fd", "")
	}
	for _, nr := range copiesArg0 {
		a.jeq(nr, "fd", "")
	}
	for _, nr := range copiesArg2 {
		a.jeq(nr, "fd2", "")
	}
	for _, nr := range dups {
		a.jeq(nr, "fd", "")
	}
	a.jeq(unix.SYS_FCNTL, "fcntl", "")
	a.jeq(unix.SYS_IOCTL, "ioctl", "")
	// fallocate on a descriptor of SyncFDBase or above: on an
	// O_SYNC/O_DSYNC file ext4 and XFS make its change durable before it
	// returns (fallocateSync).
	a.jeq(unix.SYS_FALLOCATE, "fd", "")
	a.jeq(sysFileSetattr, "notify", "")
	a.ret(unix.SECCOMP_RET_ALLOW)
	a.label("fcntl")
	a.load(argLow(1))
	a.jeq(unix.F_DUPFD, "fd", "")
	a.jeq(unix.F_DUPFD_CLOEXEC, "fd", "allow")
	a.label("ioctl")
	a.load(argLow(1))
	for _, cmd := range ioctlsTrapped {
		a.jeq(cmd, "notify", "")
	}
	a.ret(unix.SECCOMP_RET_ALLOW)
	a.label("flags1")
	a.load(argLow(1))
	a.jset(unix.O_DSYNC, "notify", "allow") // O_SYNC includes O_DSYNC
	a.label("flags2")
	a.load(argLow(2))
	a.jset(unix.O_DSYNC, "notify", "allow")
	a.label("rwf")
	a.load(argLow(5))
	a.jset(unix.RWF_DSYNC|unix.RWF_SYNC, "notify", "")
	// A descriptor is an int to the kernel: only the argument's low half
	// counts (a value with the high half set is still the descriptor its
	// low half names: the review's write(fd|1<<32) went through unheld,
	// TestSyncWriteWithHighFDBitsHeld). A negative one (as an int) runs:
	// the kernel says EBADF.
	a.label("fd")
	a.load(argLow(0))
	a.jge(1<<31, "allow", "")
	a.jge(SyncFDBase, "notify", "allow")
	a.label("fd2")
	a.load(argLow(2))
	a.jge(1<<31, "allow", "")
	a.jge(SyncFDBase, "notify", "allow")
	a.label("notify")
	a.ret(unix.SECCOMP_RET_USER_NOTIF)
	a.label("allow")
	a.ret(unix.SECCOMP_RET_ALLOW)
	a.label("enosys")
	a.ret(unix.SECCOMP_RET_ERRNO | uint32(unix.ENOSYS))
	return a.program()
}

// RunChild is the child side: install the filter on this thread, send the
// listener to the parent on fd 3, exec args (or, with GroupEnv, run them
// as a child: runGroup; with ExecEnv: runExecLeader). It returns only on
// error.
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
		unix.SECCOMP_FILTER_FLAG_NEW_LISTENER|unix.SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV, uintptr(unsafe.Pointer(&fprog)))
	if errno != 0 {
		return fmt.Errorf("installing seccomp filter: %w", errno)
	}
	if err := unix.Sendmsg(3, []byte{0}, unix.UnixRights(int(fd)), nil, 0); err != nil {
		return fmt.Errorf("handing the listener to the supervisor: %w", err)
	}
	unix.Close(3)
	if sup, ok := os.LookupEnv(GroupEnv); ok {
		// The group's leader keeps its copy of the listener (close-on-
		// exec: the command does not get it) until it dies. When only
		// the supervisor's copy was left, the supervisor's death closed
		// the listener, and the kernel then answered every call held or
		// made after with ENOSYS, until the leader's reaction to the
		// parent-death signal killed the group: a service took "not
		// implemented" from fdatasync for one that may have been done
		// (TestCallsWaitForGroupKillAfterSupervisorDies). With this copy open
		// those calls wait, unanswered, for the group's SIGKILL.
		os.Unsetenv(GroupEnv)
		endFD := -1
		if v, ok := os.LookupEnv(groupEndEnv); ok {
			os.Unsetenv(groupEndEnv)
			if endFD, err = strconv.Atoi(v); err != nil || endFD < 3 {
				return fmt.Errorf("%s=%q: not a descriptor", groupEndEnv, v)
			}
		}
		return runGroup(path, args, sup, endFD)
	}
	if parent, ok := os.LookupEnv(ExecEnv); ok {
		// duet exec's command: this process stays between them and
		// keeps its copy of the listener (runExecLeader).
		os.Unsetenv(ExecEnv)
		unix.CloseOnExec(execDoneFD) // the command does not get it
		err := runExecLeader(path, args, parent, int(fd))
		// It returns only before the command ran: ended by itself,
		// nothing to adopt.
		unix.Write(execDoneFD, []byte{1})
		return err
	}
	unix.Close(int(fd))
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

// Timing is how long the supervisor held one durability call.
type Timing struct {
	NR int32
	// Held runs from the seccomp notification to the answer; Wait is
	// the part spent in the barrier (Func); Local is the caller's own
	// flush, run beside it (0: none).
	Held, Wait, Local time.Duration
}

// Observer is told each held call's Timing once the call is answered.
type Observer func(Timing)

// supervisor is what answers the notifications: the barrier, and who is
// told how long each call took (nil: nobody).
type supervisor struct {
	wait    Func
	observe Observer
	// install serialises the O_SYNC opens of this listener's processes
	// (see install): its own, so that a process slow to take its file
	// holds up no other service's.
	install *installs
}

// installs serialises the O_SYNC opens of one listener's processes, and
// says whether one was ever installed: until then no descriptor of theirs
// can be an O_SYNC/O_DSYNC file duet placed, and a call on one the
// supervisor cannot look at (takeCallerFD) may run.
type installs struct {
	sync.Mutex
	any atomic.Bool
}

// hold waits for the barrier and says how long that took.
func (s supervisor) hold(nr int32) (time.Duration, error) {
	start := time.Now()
	err := s.wait(nr)
	return time.Since(start), err
}

// done reports a call's timing, start being its notification.
func (s supervisor) done(nr int32, start time.Time, wait, local time.Duration) {
	if s.observe != nil {
		s.observe(Timing{NR: nr, Held: time.Since(start), Wait: wait, Local: local})
	}
}

// Start starts args supervised and returns the running command. self is
// the duet binary; observe, if not nil, is told how long each durability
// call was held; setup, if not nil, adjusts the command (standard
// streams, process group) before it starts.
func Start(self string, args []string, wait Func, observe Observer, setup func(*exec.Cmd)) (*exec.Cmd, error) {
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
	if cmd.SysProcAttr != nil && cmd.SysProcAttr.Pdeathsig != 0 && slices.ContainsFunc(cmd.Env, isGroupEnv) {
		// The kernel keeps a parent-death signal per thread: the one
		// set at fork is the child's main thread's, and runGroup sets
		// its own on the thread it runs on, which Go need not have
		// kept on the main one. A SIGKILL left there killed the child
		// before it could kill its group, and the service outlived the
		// daemon (TestServiceGroupDiesWithSupervisor, once in 20 runs
		// under load; TestGroupChildOffMainThread).
		cmd.SysProcAttr.Pdeathsig = groupDeathSignal
	}
	cmd.ExtraFiles = append([]*os.File{child}, cmd.ExtraFiles...) // fd 3, then setup's
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
	go serve(listener, supervisor{wait, observe, &installs{}})
	return cmd, nil
}

// Exec runs args supervised with this process's standard streams and
// returns its exit status (128+signal when killed, as a shell does).
func Exec(ctx context.Context, self string, args []string, wait Func, observe Observer) (int, error) {
	// What the leader ran comes here if the leader dies (adoptAndKill).
	if err := unix.Prctl(unix.PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0); err != nil {
		return 0, fmt.Errorf("child subreaper: %w", err)
	}
	// The leader writes a byte here just before it exits by itself, once
	// the command and what it left have exited (execDoneFD).
	doneR, doneW, err := os.Pipe()
	if err != nil {
		return 0, err
	}
	defer doneR.Close()
	cmd, err := Start(self, args, wait, observe, func(c *exec.Cmd) {
		c.Stdin, c.Stdout, c.Stderr = os.Stdin, os.Stdout, os.Stderr
		c.Env = append(os.Environ(), ExecEnv+"="+strconv.Itoa(os.Getpid()))
		c.ExtraFiles = []*os.File{doneW}
	})
	doneW.Close()
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
	err = cmd.Wait()
	if b := make([]byte, 1); func() bool { n, _ := doneR.Read(b); return n == 0 }() {
		// The leader did not end by itself (killed, or aborted: a
		// Go runtime that throws exits 2, not by a signal): what it
		// ran is this process's now.
		fmt.Fprintf(os.Stderr, "duet exec: its supervised child ended abnormally (%v): killing %s and every process under it\n", err, args[0])
		adoptAndKill()
	}
	return ExitCode(err)
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
	// Close-on-exec: a service started later must not hold this one's
	// listener (while a copy is open elsewhere, closing ours ends nothing).
	_, oobn, _, _, err := unix.Recvmsg(sock, buf, oob, unix.MSG_CMSG_CLOEXEC)
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
//
// It waits in poll(2), which reports POLLHUP once no process uses the
// filter any more, before each SECCOMP_IOCTL_NOTIF_RECV. RECV alone does
// not tell: on this kernel (6.18) it returns ENOENT at once when no
// process is left, as it does for a notification whose caller died while
// queued, and a loop that asked again on ENOENT spun a CPU for every
// service that had stopped, for the daemon's whole life.
func serve(listener int, sup supervisor) {
	var calls sync.WaitGroup
	defer func() {
		// The answers still running send on the listener: it is closed
		// (and its number free for another file) after the last.
		calls.Wait()
		unix.Close(listener)
	}()
	for {
		fds := []unix.PollFd{{Fd: int32(listener), Events: unix.POLLIN}}
		if _, err := unix.Poll(fds, -1); err != nil {
			if errors.Is(err, unix.EINTR) {
				continue
			}
			if errors.Is(err, unix.ENOMEM) || errors.Is(err, unix.EAGAIN) {
				time.Sleep(10 * time.Millisecond)
				continue
			}
			// A group's leader holds the listener too (RunChild): its
			// processes' calls now wait, unanswered, until they stop.
			fmt.Fprintf(os.Stderr, "duet: the barrier stopped answering durability calls (poll: %v): they wait until the supervised processes are stopped\n", err)
			return
		}
		if fds[0].Revents&unix.POLLIN == 0 {
			if fds[0].Revents&(unix.POLLHUP|unix.POLLNVAL) != 0 {
				return // no process left with the filter
			}
			// POLLERR is not the end: seccomp's poll reports it when a
			// signal (the Go runtime's preemption, SIGURG) interrupted
			// its wait for the filter's lock. The processes still run.
			continue
		}
		var req seccompNotif
		if err := ioctl(listener, unix.SECCOMP_IOCTL_NOTIF_RECV, unsafe.Pointer(&req)); err != nil {
			if errors.Is(err, unix.EINTR) || errors.Is(err, unix.ENOENT) {
				// Its caller died while it was queued (or the last
				// process went): poll says which.
				continue
			}
			if !errors.Is(err, unix.ENOTCONN) { // ENOTCONN: no process left with the filter
				fmt.Fprintf(os.Stderr, "duet: the barrier stopped answering durability calls (receive: %v): they wait until the supervised processes are stopped\n", err)
			}
			return
		}
		calls.Add(1)
		go func() {
			defer calls.Done()
			answer(listener, req, sup)
		}()
	}
}

// answer holds one durability call until the barrier returns. An fsync or
// fdatasync is also done here, on the caller's own open file, while the
// peer applies and syncs: the two flushes overlap, and the call, once
// continued, finds little left to flush.
func answer(listener int, req seccompNotif, sup supervisor) {
	start := time.Now()
	switch req.NR {
	case unix.SYS_OPEN, unix.SYS_OPENAT, unix.SYS_OPENAT2:
		openSync(listener, &req, sup.install)
		return
	case unix.SYS_OPEN_BY_HANDLE_AT:
		openByHandleSync(listener, &req, sup.install)
		return
	case unix.SYS_WRITE, unix.SYS_PWRITE64, unix.SYS_WRITEV, unix.SYS_PWRITEV, unix.SYS_PWRITEV2:
		writeSync(listener, &req, sup, start)
		return
	case unix.SYS_IO_SUBMIT:
		aioSubmit(listener, &req, sup.wait)
		return
	case unix.SYS_SENDFILE, unix.SYS_COPY_FILE_RANGE, unix.SYS_SPLICE:
		copySync(listener, &req, sup, start)
		return
	case unix.SYS_DUP, unix.SYS_DUP2, unix.SYS_DUP3, unix.SYS_FCNTL:
		dupSync(listener, &req, sup)
		return
	case unix.SYS_FALLOCATE:
		fallocateSync(listener, &req, sup, start)
		return
	case sysFileSetattr:
		fileSetattrSync(listener, &req)
		return
	case unix.SYS_IOCTL:
		switch uint32(req.Args[1]) {
		case btrfsIocSync, btrfsIocWaitSync, fiFreeze, ext4IocCheckpoint, fsIocShutdown:
			// A syncfs, held as one (below).
		case fsIocResvsp, fsIocUnresvsp, fsIocResvsp64, fsIocUnresvsp64, fsIocZeroRange:
			fallocateSync(listener, &req, sup, start)
			return
		default:
			setflagsSync(listener, &req)
			return
		}
	}
	resp := seccompNotifResp{ID: req.ID}
	local := flushEarly(listener, &req)
	waited, err := sup.hold(req.NR)
	r := flushResult{cont: true}
	if local != nil {
		r = <-local
	}
	var errno unix.Errno
	switch {
	case err != nil:
		resp.Error = -int32(unix.EIO)
		fmt.Fprintf(os.Stderr, "duet exec: durability call %d of pid %d failed with EIO: %v\n", req.NR, req.PID, err)
	case r.cont:
		resp.Flags = unix.SECCOMP_USER_NOTIF_FLAG_CONTINUE
	case errors.As(r.err, &errno):
		// The early flush took the file's error report (it shares the
		// caller's open file description): the caller must get it.
		resp.Error = -int32(errno)
	case r.err != nil:
		resp.Error = -int32(unix.EIO)
	}
	// Otherwise the early flush did what the call asks, on the caller's
	// own open file description, after the call began: the call returns
	// 0 without running it again. (Continued, it made a second
	// fdatasync, which on ext4 may flush the device's cache again: tens
	// to hundreds of µs on every call.) Reported before the answer: the
	// answer may let the process exit and Exec return, and a timing
	// reported after that was lost (TestCallTimingObserved, once in CI).
	sup.done(req.NR, start, waited, r.took)
	ioctl(listener, unix.SECCOMP_IOCTL_NOTIF_SEND, unsafe.Pointer(&resp))
}

// takeFD returns a duplicate of descriptor fd of the notifying thread (the
// same open file description: offset, flags, error reports are shared).
func takeFD(listener int, req *seccompNotif, fd int) (int, error) {
	pidfd, err := unix.PidfdOpen(int(req.PID), pidfdThread)
	if err != nil {
		if pidfd, err = unix.PidfdOpen(int(req.PID), 0); err != nil {
			return -1, err
		}
	}
	dup, err := unix.PidfdGetfd(pidfd, fd, 0)
	unix.Close(pidfd)
	if err != nil {
		return -1, err
	}
	// The thread may have died and its number been reused between the
	// notification and pidfd_open: the descriptor counts only if the
	// notification is still pending.
	if err := notifValid(listener, req.ID); err != nil {
		unix.Close(dup)
		return -1, err
	}
	return dup, nil
}

func notifValid(listener int, id uint64) error {
	return ioctl(listener, unix.SECCOMP_IOCTL_NOTIF_ID_VALID, unsafe.Pointer(&id))
}

// pidfdThread is PIDFD_THREAD (Linux 6.9): a pidfd for one thread, which
// need not lead its thread group.
const pidfdThread = unix.O_EXCL

// flushEarly starts the caller's fsync or fdatasync on a duplicate of its
// descriptor and returns where its result arrives; nil when the call is
// of another kind or the descriptor cannot be taken (the continued call
// then does all the local work, as without overlap).
func flushEarly(listener int, req *seccompNotif) <-chan flushResult {
	var datasync bool
	switch req.NR {
	case unix.SYS_FSYNC:
	case unix.SYS_FDATASYNC:
		datasync = true
	default:
		return nil
	}
	fd, err := takeFD(listener, req, int(int32(req.Args[0])))
	if err != nil {
		return nil
	}
	done := make(chan flushResult, 1)
	go func() {
		defer unix.Close(fd)
		start := time.Now()
		// On a kernel worker (aiosync): a supervisor answering many
		// callers at once held a P per flush, and the goroutines that
		// ship the data the calls wait for waited for a P.
		err := aiosync.Sync(fd, datasync)
		// Nothing to flush (a pipe, a socket): the continued call
		// reports this itself. Interrupted (a signal to this process,
		// not the caller's): the call runs the flush itself.
		cont := errors.Is(err, unix.EINVAL) || errors.Is(err, unix.EROFS) || errors.Is(err, unix.EINTR)
		done <- flushResult{err: err, took: time.Since(start), cont: cont}
	}()
	return done
}

// flushResult is how an early flush ended, and how long it took; cont:
// the kernel must run the call itself (no early flush, or one the call
// would refuse).
type flushResult struct {
	err  error
	took time.Duration
	cont bool
}

// ioctl makes a seccomp listener request, again when a signal interrupted
// it: RECV, SEND, ID_VALID and ADDFD take the filter's lock interruptibly
// and fail with EINTR (not restarted) before they change anything. A SEND
// lost that way left its caller blocked for good; an ID_VALID lost that
// way was taken for a dead caller. (ADDFD's later wait for the caller to
// take the file is restarted by the kernel; see install.)
func ioctl(fd int, req uintptr, arg unsafe.Pointer) error {
	_, err := ioctlRet(fd, req, arg)
	return err
}
