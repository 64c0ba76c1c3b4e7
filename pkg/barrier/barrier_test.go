package barrier

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// The test binary doubles as the supervised child when re-executed.
func TestMain(m *testing.M) {
	if len(os.Args) > 1 && os.Args[1] == ChildCommand {
		args := os.Args[2:]
		if len(args) > 0 && args[0] == "--" {
			args = args[1:]
		}
		if os.Getenv(childOffMainEnv) != "" {
			fmt.Fprintln(os.Stderr, runOffMainThread(func() error { return RunChild(args) }))
			os.Exit(127)
		}
		fmt.Fprintln(os.Stderr, RunChild(args))
		os.Exit(127)
	}
	if s := os.Getenv("DUET_BARRIER_SUPERVISOR"); s != "" {
		os.Exit(supervisorHelper(s))
	}
	if s := os.Getenv(countingSupervisorEnv); s != "" {
		os.Exit(countingSupervisor(s))
	}
	if s := os.Getenv("DUET_BARRIER_EXEC"); s != "" {
		os.Exit(execHelper(s))
	}
	if h := os.Getenv("DUET_BARRIER_HELPER"); h != "" {
		os.Exit(helper(h))
	}
	os.Exit(m.Run())
}

// childOffMainEnv makes the supervised child run RunChild on a thread
// other than its main one (TestGroupChildOffMainThread).
const childOffMainEnv = "DUET_BARRIER_CHILD_OFF_MAIN"

// runOffMainThread runs fn locked to a thread that is not the process's
// main thread, and returns its error. A goroutine that finds itself on the
// main thread stays there, locked, so the next one cannot get it.
func runOffMainThread(fn func() error) error {
	res := make(chan error)
	var try func()
	try = func() {
		runtime.LockOSThread()
		if unix.Gettid() == unix.Getpid() {
			go try()
			select {}
		}
		res <- fn()
	}
	go try()
	return <-res
}

// helper is the supervised program of TestErrnoPassesThrough: it makes
// one durability call and exits with its errno (0 on success).
func helper(mode string) int {
	var err error
	switch mode {
	case "fsync-pipe":
		_, w, perr := os.Pipe()
		if perr != nil {
			return 100
		}
		err = unix.Fsync(int(w.Fd()))
	case "fdatasync-badfd":
		err = unix.Fdatasync(987)
	case "fdatasync-file":
		f, ferr := os.CreateTemp("", "duet-barrier")
		if ferr != nil {
			return 100
		}
		defer os.Remove(f.Name())
		f.WriteString("x")
		err = unix.Fdatasync(int(f.Fd()))
	case "dsync":
		return dsyncHelper(os.Getenv("DUET_BARRIER_FILE"))
	case "aio-fdsync", "aio-dsync", "aio-write", "aio-odsync", "aio-direct":
		return aioHelper(mode, os.Getenv("DUET_BARRIER_FILE"))
	case "x32-fsync":
		return x32Fsync()
	case "fsync-storm":
		return fsyncStorm()
	case "fdatasync-loop":
		return fdatasyncLoop(os.Getenv("DUET_BARRIER_PIDFILE"), os.Getenv("DUET_BARRIER_FILE"), os.Getenv("DUET_BARRIER_RESULT"))
	case "open-storm":
		return openStorm(os.Getenv("DUET_BARRIER_FILE"))
	case "aio-write-fdsync":
		return aioWriteThenFdsync(os.Getenv("DUET_BARRIER_FILE"))
	case "dsync-sendfile", "dsync-copy-file-range", "dsync-splice":
		return dsyncByKernelCopy(mode, os.Getenv("DUET_BARRIER_FILE"))
	case "dsync-by-handle":
		return dsyncByHandle(os.Getenv("DUET_BARRIER_FILE"))
	case "handle-without-dac-override":
		return handleWithoutDACOverride(os.Getenv("DUET_BARRIER_FILE"))
	case "suid-copy":
		return suidCopy(os.Getenv("DUET_BARRIER_FILE"))
	case "suid-readonly-copy":
		return suidReadOnlyCopy(os.Getenv("DUET_BARRIER_FILE"), os.Getenv("DUET_BARRIER_CALL"))
	case "splice-from-fifo":
		return spliceFromFIFO(os.Getenv("DUET_BARRIER_FIFO"), os.Getenv("DUET_BARRIER_FILE"), os.Getenv("DUET_BARRIER_PIDFILE"))
	default:
		if code, ok := fdsyncHelper(mode, os.Getenv("DUET_BARRIER_FILE")); ok {
			return code
		}
		if code, ok := fdsyncHelper2(mode, os.Getenv("DUET_BARRIER_FILE")); ok {
			return code
		}
		return 101
	}
	var errno unix.Errno
	if errors.As(err, &errno) {
		return int(errno)
	}
	if err != nil {
		return 102
	}
	return 0
}

func supervise(t *testing.T, wait Func, args ...string) int {
	t.Helper()
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	code, err := Exec(context.Background(), self, args, wait, nil)
	if err != nil {
		t.Fatalf("Exec %v: %v", args, err)
	}
	return code
}

func counting(n *atomic.Int32, err error) Func {
	return func(int32) error {
		n.Add(1)
		return err
	}
}

func TestExitStatusPassesThrough(t *testing.T) {
	var n atomic.Int32
	if code := supervise(t, counting(&n, nil), "sh", "-c", "exit 3"); code != 3 {
		t.Fatalf("exit status %d, want 3", code)
	}
	if code := supervise(t, counting(&n, nil), "sh", "-c", "kill -TERM $$"); code != 128+int(unix.SIGTERM) {
		t.Fatalf("killed by SIGTERM: status %d, want %d", code, 128+int(unix.SIGTERM))
	}
}

// A grandchild's fsync is held too: the filter is inherited.
func TestChildrenAreSupervised(t *testing.T) {
	var n atomic.Int32
	f := filepath.Join(t.TempDir(), "f")
	code := supervise(t, counting(&n, nil), "sh", "-c", "dd if=/dev/zero of="+f+" bs=1 count=1 conv=fsync 2>/dev/null; sync")
	if code != 0 {
		t.Fatalf("exit %d", code)
	}
	if n.Load() < 2 {
		t.Fatalf("%d durability calls seen, want the fsync of dd and the sync", n.Load())
	}
}

// When the barrier cannot confirm, the call fails with EIO.
func TestUnconfirmedFsyncFails(t *testing.T) {
	var n atomic.Int32
	f := filepath.Join(t.TempDir(), "f")
	code := supervise(t, counting(&n, errors.New("peer unreachable")), "dd", "if=/dev/zero", "of="+f, "bs=1", "count=1", "conv=fsync")
	if code == 0 || n.Load() == 0 {
		t.Fatalf("dd exit %d after %d refused fsyncs: the failure did not reach the program", code, n.Load())
	}
}

// A failing durability call fails as it would unsupervised: the early
// local flush (done by the supervisor on a copy of the descriptor) must
// hand its errno to the caller or leave the call to report it.
func TestErrnoPassesThrough(t *testing.T) {
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	for mode, want := range map[string]int{"fsync-pipe": int(unix.EINVAL), "fdatasync-badfd": int(unix.EBADF), "fdatasync-file": 0} {
		var n atomic.Int32
		t.Setenv("DUET_BARRIER_HELPER", mode)
		if code := supervise(t, counting(&n, nil), self); code != want {
			t.Errorf("%s: exit %d, want errno %d", mode, code, want)
		}
		if n.Load() != 1 {
			t.Errorf("%s: %d durability calls held, want 1", mode, n.Load())
		}
	}
}

// dsyncHelper opens file with O_DSYNC and writes through every write call;
// exit 0 when each wrote all of its bytes and the descriptor was placed
// where the filter holds its writes.
func dsyncHelper(file string) int {
	unix.Umask(0o077)
	f, err := os.OpenFile(file, os.O_WRONLY|os.O_CREATE|os.O_APPEND|unix.O_DSYNC, 0o644)
	if err != nil {
		fmt.Fprintln(os.Stderr, "open:", err)
		return 110
	}
	if f.Fd() < SyncFDBase {
		fmt.Fprintln(os.Stderr, "O_DSYNC file at descriptor", f.Fd())
		return 111
	}
	fd := int(f.Fd())
	steps := []func() (int, error){
		func() (int, error) { return unix.Write(fd, []byte("write\n")) },
		func() (int, error) { return unix.Pwrite(fd, []byte("pwrite\n"), 0) }, // O_APPEND: appends
		func() (int, error) { return unix.Writev(fd, [][]byte{[]byte("wri"), []byte("tev\n")}) },
	}
	for i, step := range steps {
		if n, err := step(); err != nil || n == 0 {
			fmt.Fprintln(os.Stderr, "step", i, n, err)
			return 112 + i
		}
	}
	// A file opened without O_DSYNC, written with RWF_DSYNC.
	g, err := os.OpenFile(file+".rwf", os.O_WRONLY|os.O_CREATE, 0o644)
	if err != nil {
		return 120
	}
	if n, err := unix.Pwritev2(int(g.Fd()), [][]byte{[]byte("rwf\n")}, 0, unix.RWF_DSYNC); err != nil || n != 4 {
		fmt.Fprintln(os.Stderr, "pwritev2:", n, err)
		return 121
	}
	// A read-only O_DSYNC descriptor refuses writes as usual.
	r, err := os.OpenFile(file, os.O_RDONLY|unix.O_DSYNC, 0)
	if err != nil {
		return 122
	}
	if _, err := unix.Write(int(r.Fd()), []byte("x")); !errors.Is(err, unix.EBADF) {
		fmt.Fprintln(os.Stderr, "write on a read-only descriptor:", err)
		return 123
	}
	return 0
}

// Writes to a file opened with O_DSYNC, and RWF_DSYNC writes, wait for the
// barrier and land in the file as the program meant.
func TestSyncWritesWait(t *testing.T) {
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	file := filepath.Join(dir, "log")
	t.Setenv("DUET_BARRIER_HELPER", "dsync")
	t.Setenv("DUET_BARRIER_FILE", file)
	var n atomic.Int32
	if code := supervise(t, counting(&n, nil), self); code != 0 {
		t.Fatalf("helper exit %d", code)
	}
	if n.Load() != 4 {
		t.Errorf("%d writes held for the barrier, want 4 (write, pwrite, writev, pwritev2 with RWF_DSYNC)", n.Load())
	}
	got, _ := os.ReadFile(file)
	if string(got) != "write\npwrite\nwritev\n" {
		t.Errorf("file holds %q", got)
	}
	if got, _ := os.ReadFile(file + ".rwf"); string(got) != "rwf\n" {
		t.Errorf("RWF_DSYNC file holds %q", got)
	}
	st, err := os.Stat(file)
	if err != nil || st.Mode().Perm() != 0o600 {
		t.Errorf("created with mode %v (%v), want 0600: the caller's umask 077 applies", st.Mode().Perm(), err)
	}
	// A refused barrier fails the write with EIO.
	var m atomic.Int32
	if code := supervise(t, counting(&m, errors.New("peer unreachable")), self); code != 112 {
		t.Errorf("helper exit %d with the barrier refusing, want 112 (the first write fails)", code)
	}
}

// A file a supervised process creates with O_DSYNC belongs to it, not to
// the supervisor that opened it on its behalf.
func TestSyncOpenUsesCallerCredentials(t *testing.T) {
	self, dir := nobodyCopy(t, "duet-barrier-")
	if st, err := os.Stat(os.TempDir()); err != nil || st.Mode().Perm()&0o001 == 0 {
		t.Skipf("%s is not searchable by others: the helper cannot run as nobody", os.TempDir())
	}
	file := filepath.Join(dir, "log")
	t.Setenv("DUET_BARRIER_HELPER", "dsync")
	t.Setenv("DUET_BARRIER_FILE", file)
	var n atomic.Int32
	cmd, err := Start(self, []string{self}, counting(&n, nil), nil, func(c *exec.Cmd) {
		c.Stderr = os.Stderr
		c.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 65534, Gid: 65534}}
	})
	if err != nil {
		t.Fatal(err)
	}
	if code, _ := ExitCode(cmd.Wait()); code != 0 {
		t.Fatalf("helper as nobody: exit %d", code)
	}
	var st unix.Stat_t
	if err := unix.Stat(file, &st); err != nil || st.Uid != 65534 || st.Gid != 65534 {
		t.Fatalf("file owned by %d:%d (%v), want 65534:65534", st.Uid, st.Gid, err)
	}
}

// nobodyCopy returns a copy of the test binary that nobody (65534) may
// run, in a new directory under the temporary directory that anyone may
// write to (removed at the end), and that directory. It skips the test
// unless run as root, which the helper needs to run as another user.
func nobodyCopy(t *testing.T, prefix string) (self, dir string) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root, to run the helper as another user")
	}
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	dir, err = os.MkdirTemp("", prefix)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	if err := os.Chmod(dir, 0o777); err != nil {
		t.Fatal(err)
	}
	bin, err := os.ReadFile(self)
	if err != nil {
		t.Fatal(err)
	}
	self = filepath.Join(dir, "barrier.test")
	if err := os.WriteFile(self, bin, 0o755); err != nil {
		t.Fatal(err)
	}
	return self, dir
}

// run evaluates a classic BPF program on a seccomp_data.
func run(prog []unix.SockFilter, nr uint32, args ...uint64) uint32 {
	data := make([]byte, 64)
	binary.LittleEndian.PutUint32(data[0:], nr)
	binary.LittleEndian.PutUint32(data[4:], unix.AUDIT_ARCH_X86_64)
	for i, a := range args {
		binary.LittleEndian.PutUint64(data[16+8*i:], a)
	}
	var acc uint32
	for pc := 0; pc < len(prog); pc++ {
		in := prog[pc]
		switch in.Code {
		case unix.BPF_LD | unix.BPF_W | unix.BPF_ABS:
			acc = binary.LittleEndian.Uint32(data[in.K:])
		case unix.BPF_RET | unix.BPF_K:
			return in.K
		case unix.BPF_JMP | unix.BPF_JEQ | unix.BPF_K, unix.BPF_JMP | unix.BPF_JSET | unix.BPF_K, unix.BPF_JMP | unix.BPF_JGE | unix.BPF_K:
			var ok bool
			switch in.Code & 0xf0 {
			case unix.BPF_JEQ:
				ok = acc == in.K
			case unix.BPF_JSET:
				ok = acc&in.K != 0
			case unix.BPF_JGE:
				ok = acc >= in.K
			}
			if ok {
				pc += int(in.Jt)
			} else {
				pc += int(in.Jf)
			}
		default:
			panic(fmt.Sprintf("instruction %#x", in.Code))
		}
	}
	panic("fell off the program")
}

func TestFilterDecisions(t *testing.T) {
	f := filter()
	const (
		notify = unix.SECCOMP_RET_USER_NOTIF
		allow  = unix.SECCOMP_RET_ALLOW
		enosys = unix.SECCOMP_RET_ERRNO | uint32(unix.ENOSYS)
	)
	neg := uint64(0xffffffffffffffff) // fd -1
	for _, c := range []struct {
		name string
		nr   uint32
		args []uint64
		want uint32
	}{
		{"fsync", unix.SYS_FSYNC, []uint64{3}, notify},
		{"fdatasync", unix.SYS_FDATASYNC, []uint64{3}, notify},
		{"msync", unix.SYS_MSYNC, nil, notify},
		{"sync", unix.SYS_SYNC, nil, notify},
		{"syncfs", unix.SYS_SYNCFS, nil, notify},
		{"sync_file_range", unix.SYS_SYNC_FILE_RANGE, nil, notify},
		{"io_uring_setup", unix.SYS_IO_URING_SETUP, nil, enosys},
		{"read", unix.SYS_READ, []uint64{600}, allow},
		{"write low fd", unix.SYS_WRITE, []uint64{3}, allow},
		{"write sync fd", unix.SYS_WRITE, []uint64{SyncFDBase}, notify},
		{"write -1", unix.SYS_WRITE, []uint64{neg}, allow},
		{"pwrite64 sync fd", unix.SYS_PWRITE64, []uint64{SyncFDBase + 100}, notify},
		{"writev sync fd", unix.SYS_WRITEV, []uint64{1000}, notify},
		{"pwritev low fd", unix.SYS_PWRITEV, []uint64{4}, allow},
		{"pwritev2 RWF_DSYNC", unix.SYS_PWRITEV2, []uint64{4, 0, 0, 0, 0, unix.RWF_DSYNC}, notify},
		{"pwritev2 RWF_SYNC", unix.SYS_PWRITEV2, []uint64{4, 0, 0, 0, 0, unix.RWF_SYNC}, notify},
		{"pwritev2 plain", unix.SYS_PWRITEV2, []uint64{4, 0, 0, 0, 0, unix.RWF_NOWAIT}, allow},
		{"openat O_DSYNC", unix.SYS_OPENAT, []uint64{0, 0, unix.O_WRONLY | unix.O_DSYNC}, notify},
		{"openat O_SYNC", unix.SYS_OPENAT, []uint64{0, 0, unix.O_WRONLY | unix.O_SYNC}, notify},
		{"openat plain", unix.SYS_OPENAT, []uint64{0, 0, unix.O_WRONLY | unix.O_CREAT}, allow},
		{"open O_DSYNC", unix.SYS_OPEN, []uint64{0, unix.O_RDWR | unix.O_DSYNC}, notify},
		{"open plain", unix.SYS_OPEN, []uint64{0, unix.O_RDWR}, allow},
		{"openat2", unix.SYS_OPENAT2, nil, notify},
		{"io_submit", unix.SYS_IO_SUBMIT, []uint64{1, 1, 0}, notify},
		{"open_by_handle_at O_DSYNC", unix.SYS_OPEN_BY_HANDLE_AT, []uint64{3, 0, unix.O_WRONLY | unix.O_DSYNC}, notify},
		{"open_by_handle_at plain", unix.SYS_OPEN_BY_HANDLE_AT, []uint64{3, 0, unix.O_WRONLY}, allow},
		{"sendfile to sync fd", unix.SYS_SENDFILE, []uint64{SyncFDBase, 3}, notify},
		{"sendfile to low fd", unix.SYS_SENDFILE, []uint64{4, SyncFDBase}, allow},
		{"copy_file_range to sync fd", unix.SYS_COPY_FILE_RANGE, []uint64{3, 0, SyncFDBase + 1}, notify},
		{"copy_file_range to low fd", unix.SYS_COPY_FILE_RANGE, []uint64{SyncFDBase, 0, 4}, allow},
		{"splice to sync fd", unix.SYS_SPLICE, []uint64{3, 0, 900}, notify},
		{"splice to low fd", unix.SYS_SPLICE, []uint64{900, 0, 5}, allow},
		{"splice to -1", unix.SYS_SPLICE, []uint64{3, 0, neg}, allow},
		{"write sync fd, high half set", unix.SYS_WRITE, []uint64{1<<32 | SyncFDBase}, notify},
		{"dup2 of a sync fd", unix.SYS_DUP2, []uint64{SyncFDBase, 1}, notify},
		{"dup2 of a low fd", unix.SYS_DUP2, []uint64{3, 1}, allow},
		{"dup3 of a sync fd", unix.SYS_DUP3, []uint64{SyncFDBase + 7, 1, 0}, notify},
		{"dup of a sync fd", unix.SYS_DUP, []uint64{SyncFDBase}, notify},
		{"fcntl F_DUPFD of a sync fd", unix.SYS_FCNTL, []uint64{SyncFDBase, unix.F_DUPFD, 0}, notify},
		{"fcntl F_DUPFD_CLOEXEC of a sync fd", unix.SYS_FCNTL, []uint64{SyncFDBase, unix.F_DUPFD_CLOEXEC, 0}, notify},
		{"fcntl F_GETFL of a sync fd", unix.SYS_FCNTL, []uint64{SyncFDBase, unix.F_GETFL}, allow},
		{"fcntl F_DUPFD of a low fd", unix.SYS_FCNTL, []uint64{3, unix.F_DUPFD, 0}, allow},
		{"fallocate on a sync fd", unix.SYS_FALLOCATE, []uint64{SyncFDBase, 0, 0, 4096}, notify},
		{"fallocate on a low fd", unix.SYS_FALLOCATE, []uint64{3, 0, 0, 4096}, allow},
		{"ioctl FS_IOC_SETFLAGS", unix.SYS_IOCTL, []uint64{3, unix.FS_IOC_SETFLAGS}, notify},
		{"ioctl FS_IOC_FSSETXATTR", unix.SYS_IOCTL, []uint64{3, fsIocFssetxattr}, notify},
		{"ioctl BTRFS_IOC_SYNC", unix.SYS_IOCTL, []uint64{3, btrfsIocSync}, notify},
		// From a review (TestSyncingIoctlsHeld): each syncs the
		// filesystem before it returns.
		{"ioctl FIFREEZE", unix.SYS_IOCTL, []uint64{3, 0xc0045877}, notify},
		{"ioctl EXT4_IOC_CHECKPOINT", unix.SYS_IOCTL, []uint64{3, 0x4004662b}, notify},
		{"ioctl FS_IOC_SHUTDOWN", unix.SYS_IOCTL, []uint64{3, 0x8004587d}, notify},
		{"ioctl FITHAW", unix.SYS_IOCTL, []uint64{3, 0xc0045878}, allow},
		{"ioctl FS_IOC_GETFLAGS", unix.SYS_IOCTL, []uint64{3, unix.FS_IOC_GETFLAGS}, allow},
		{"file_setattr", unix.SYS_FILE_SETATTR, nil, notify},
		{"preadv2 RWF_DSYNC", unix.SYS_PREADV2, []uint64{4, 0, 0, 0, 0, unix.RWF_DSYNC}, allow},
		{"x32 fsync", x32Bit | unix.SYS_FSYNC, []uint64{3}, enosys},
		{"x32 write sync fd", x32Bit | unix.SYS_WRITE, []uint64{SyncFDBase}, enosys},
		{"x32 read", x32Bit | unix.SYS_READ, []uint64{3}, enosys},
	} {
		if got := run(f, c.nr, c.args...); got != c.want {
			t.Errorf("%s: %#x, want %#x", c.name, got, c.want)
		}
	}
}

// aioIocb is struct iocb (64 bytes, little-endian x86-64 layout).
type aioIocb struct {
	Data      uint64
	Key       uint32
	RWFlags   uint32
	Opcode    uint16
	Reqprio   int16
	Fd        uint32
	Buf       uint64
	Nbytes    uint64
	Offset    int64
	Reserved2 uint64
	Flags     uint32
	Resfd     uint32
}

// aioPayload is what aioHelper writes in mode: one 4 KiB block for
// O_DIRECT.
func aioPayload(mode string) string {
	if mode == "aio-direct" {
		return mode + "\n" + strings.Repeat(".", 4096-len(mode)-1)
	}
	return mode + "\n"
}

// aioHelper makes one Linux AIO request on file with io_submit and waits
// for its completion: a plain write; an RWF_DSYNC write; a write to a file
// opened with O_DSYNC, or O_DSYNC|O_DIRECT; a written byte then an
// IOCB_CMD_FDSYNC. Exit 0 when the request completed fully.
func aioHelper(mode, file string) int {
	flags := os.O_RDWR | os.O_CREATE
	switch mode {
	case "aio-odsync":
		flags |= unix.O_DSYNC
	case "aio-direct":
		flags |= unix.O_DSYNC | unix.O_DIRECT
	}
	f, err := os.OpenFile(file, flags, 0o644)
	if err != nil {
		fmt.Fprintln(os.Stderr, "open:", err)
		return 130
	}
	var ctx uint64
	if _, _, e := unix.Syscall(unix.SYS_IO_SETUP, 1, uintptr(unsafe.Pointer(&ctx)), 0); e != 0 {
		fmt.Fprintln(os.Stderr, "io_setup:", e)
		return 131
	}
	// Page-aligned, as O_DIRECT wants.
	data, err := unix.Mmap(-1, 0, 4096, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
	if err != nil {
		return 132
	}
	data = data[:copy(data, aioPayload(mode))]
	cb := aioIocb{Opcode: iocbCmdPwrite, Fd: uint32(f.Fd()), Buf: uint64(uintptr(unsafe.Pointer(&data[0]))), Nbytes: uint64(len(data))}
	switch mode {
	case "aio-dsync":
		cb.RWFlags = unix.RWF_DSYNC
	case "aio-fdsync":
		if _, err := f.Write(data); err != nil {
			return 133
		}
		cb = aioIocb{Opcode: iocbCmdFdsync, Fd: uint32(f.Fd())}
	}
	cbs := []uintptr{uintptr(unsafe.Pointer(&cb))}
	if n, _, e := unix.Syscall(unix.SYS_IO_SUBMIT, uintptr(ctx), 1, uintptr(unsafe.Pointer(&cbs[0]))); e != 0 || n != 1 {
		fmt.Fprintln(os.Stderr, "io_submit:", n, e)
		return 134
	}
	var ev [4]int64 // struct io_event: data, obj, res, res2
	n, _, e := unix.Syscall6(unix.SYS_IO_GETEVENTS, uintptr(ctx), 1, 1, uintptr(unsafe.Pointer(&ev)), 0, 0)
	for e == unix.EINTR { // a signal (Go's preemption) ends the wait with nothing reaped
		n, _, e = unix.Syscall6(unix.SYS_IO_GETEVENTS, uintptr(ctx), 1, 1, uintptr(unsafe.Pointer(&ev)), 0, 0)
	}
	if e != 0 || n != 1 {
		fmt.Fprintln(os.Stderr, "io_getevents:", n, e)
		return 135
	}
	runtime.KeepAlive(cb)
	if want := int64(cb.Nbytes); ev[2] != want {
		fmt.Fprintln(os.Stderr, "aio result", ev[2], "want", want)
		return 136
	}
	return 0
}

// Durability asked through Linux AIO waits for the barrier: an
// IOCB_CMD_FDSYNC, and a synchronous write (RWF_DSYNC, or to a file opened
// with O_DSYNC), whose bytes must already be in the file (where the
// capture sees them) when the barrier runs. A plain write is not held.
func TestAIODurabilityWaits(t *testing.T) {
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		mode  string
		holds int32
	}{{"aio-fdsync", 1}, {"aio-dsync", 1}, {"aio-odsync", 1}, {"aio-direct", 1}, {"aio-write", 0}} {
		file := filepath.Join(t.TempDir(), "f")
		t.Setenv("DUET_BARRIER_HELPER", c.mode)
		t.Setenv("DUET_BARRIER_FILE", file)
		var n atomic.Int32
		var seen atomic.Value // the file's content when the barrier ran
		seen.Store("")
		wait := func(int32) error {
			n.Add(1)
			b, _ := os.ReadFile(file)
			seen.Store(string(b))
			return nil
		}
		if code := supervise(t, wait, self); code != 0 {
			t.Errorf("%s: helper exit %d", c.mode, code)
			continue
		}
		if n.Load() != c.holds {
			t.Errorf("%s: %d barriers, want %d", c.mode, n.Load(), c.holds)
		}
		want := aioPayload(c.mode)
		if c.holds > 0 && seen.Load().(string) != want {
			t.Errorf("%s: the file held %.40q when the barrier ran, want the data it covers", c.mode, seen.Load().(string))
		}
		if got, _ := os.ReadFile(file); string(got) != want {
			t.Errorf("%s: file holds %.40q", c.mode, got)
		}
	}
}

// x32Bit marks a syscall number of the x32 ABI (__X32_SYSCALL_BIT).
const x32Bit = 0x40000000

// x32Fsync calls fsync through the x32 ABI and exits with its errno.
func x32Fsync() int {
	f, err := os.CreateTemp("", "duet-barrier")
	if err != nil {
		return 100
	}
	defer os.Remove(f.Name())
	_, _, e := unix.Syscall(x32Bit|unix.SYS_FSYNC, f.Fd(), 0, 0)
	return int(e)
}

// An x86-64 program can make x32 calls; their numbers differ from the
// ones the filter traps, so they are refused rather than let through.
func TestX32CallsRefused(t *testing.T) {
	if e := x32Fsync(); e == int(unix.ENOSYS) {
		t.Skip("kernel without CONFIG_X86_X32_ABI: x32 calls fail with ENOSYS anyway (TestFilterDecisions checks the filter)")
	}
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	t.Setenv("DUET_BARRIER_HELPER", "x32-fsync")
	var n atomic.Int32
	if code := supervise(t, counting(&n, nil), self); code != int(unix.ENOSYS) {
		t.Errorf("x32 fsync under the filter: exit %d after %d barriers, want ENOSYS (%d)", code, n.Load(), unix.ENOSYS)
	}
}

// A write ahead to an O_DIRECT file succeeds whatever the alignment of
// the bytes read from the caller (Go places them where its allocator
// likes).
func TestWriteAheadAlignsForODirect(t *testing.T) {
	f, err := os.OpenFile(filepath.Join(t.TempDir(), "f"), os.O_RDWR|os.O_CREATE|unix.O_DIRECT, 0o600)
	if err != nil {
		t.Skipf("O_DIRECT not supported here: %v", err)
	}
	defer f.Close()
	mem, err := unix.Mmap(-1, 0, 8192, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Munmap(mem)
	odd := mem[1 : 1+4096]
	if _, err := unix.Pwrite(int(f.Fd()), odd, 0); !errors.Is(err, unix.EINVAL) {
		t.Skipf("this filesystem takes unaligned O_DIRECT buffers (%v): nothing to check", err)
	}
	if err := pwriteAll(int(f.Fd()), odd, 0, 0, true); err != nil {
		t.Fatalf("write ahead from an unaligned buffer: %v", err)
	}
}

// TestCallTimingObserved: the observer learns how long a held fdatasync
// took, its time in the barrier and its own flush (the per-stage table of
// `duet status --latency` rests on these).
func TestCallTimingObserved(t *testing.T) {
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	t.Setenv("DUET_BARRIER_HELPER", "fdatasync-file")
	const delay = 20 * time.Millisecond
	var got []Timing
	var mu sync.Mutex
	code, err := Exec(context.Background(), self, []string{self}, func(int32) error {
		time.Sleep(delay)
		return nil
	}, func(tm Timing) {
		// Slow, so that a timing reported after the call's answer
		// (the process then exits and Exec returns) is surely missed.
		time.Sleep(50 * time.Millisecond)
		mu.Lock()
		got = append(got, tm)
		mu.Unlock()
	})
	if err != nil || code != 0 {
		t.Fatalf("supervised fdatasync: exit %d, %v", code, err)
	}
	mu.Lock()
	defer mu.Unlock()
	if len(got) != 1 {
		t.Fatalf("%d timings observed, want 1: %+v", len(got), got)
	}
	tm := got[0]
	if tm.NR != unix.SYS_FDATASYNC || tm.Wait < delay || tm.Held < tm.Wait || tm.Local <= 0 || tm.Local > tm.Held {
		t.Errorf("timing %+v: want NR %d, wait ≥ %v, held ≥ wait, 0 < local ≤ held", tm, unix.SYS_FDATASYNC, delay)
	}
}
