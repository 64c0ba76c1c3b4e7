package barrier

// Tests from a fresh-context review of the calls after which the kernel
// tells a program its data is durable: each failed on the code before
// fdsync.go (the call returned with no barrier asked).

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
	"sync/atomic"
	"syscall"
	"testing"
	"unsafe"

	"golang.org/x/sys/unix"
)

// fdsyncHelper runs the supervised side of this file's tests; ok false:
// not one of its modes.
func fdsyncHelper(mode, file string) (code int, ok bool) {
	switch mode {
	case "dup-sync":
		return dupSyncHelper(file), true
	case "dsync-highfd":
		// The kernel reads a descriptor as an int: the low 32 bits.
		f, err := os.OpenFile(file, os.O_WRONLY|os.O_CREATE|unix.O_DSYNC, 0o644)
		if err != nil || f.Fd() < SyncFDBase {
			fmt.Fprintln(os.Stderr, "open:", err)
			return 110, true
		}
		b := []byte("durable?\n")
		n, _, e := unix.Syscall(unix.SYS_WRITE, f.Fd()|1<<32, uintptr(unsafe.Pointer(&b[0])), uintptr(len(b)))
		runtime.KeepAlive(b)
		if e != 0 || int(n) != len(b) {
			fmt.Fprintln(os.Stderr, "write:", n, e)
			return 111, true
		}
		return 0, true
	case "sync-flags":
		return syncFlagsHelper(file), true
	case "fallocate-dsync":
		f, err := os.OpenFile(file, os.O_WRONLY|os.O_CREATE|unix.O_DSYNC, 0o644)
		if err != nil {
			return 140, true
		}
		if err := unix.Fallocate(int(f.Fd()), 0, 0, 8192); err != nil {
			fmt.Fprintln(os.Stderr, "fallocate:", err)
			return 141, true
		}
		if st, err := f.Stat(); err != nil || st.Size() != 8192 {
			fmt.Fprintln(os.Stderr, "size after fallocate:", st.Size(), err)
			return 142, true
		}
		return 0, true
	case "btrfs-ioc-sync":
		f, err := os.Open(file)
		if err != nil {
			return 150, true
		}
		// Not btrfs: the kernel's answer (ENOTTY) once held.
		if _, _, e := unix.Syscall(unix.SYS_IOCTL, f.Fd(), btrfsIocSync, 0); e != unix.ENOTTY {
			fmt.Fprintln(os.Stderr, "BTRFS_IOC_SYNC:", e)
			return 151, true
		}
		return 0, true
	case "aio-fdsync-nondumpable", "rwf-dsync-nondumpable":
		// A program that made itself non-dumpable (as ssh-agent does): a
		// supervisor without CAP_SYS_PTRACE can read neither its memory
		// nor its descriptors. Exit 0: the call succeeded; 2: it failed.
		if err := unix.Prctl(unix.PR_SET_DUMPABLE, 0, 0, 0, 0); err != nil {
			return 160, true
		}
		if mode == "aio-fdsync-nondumpable" {
			if code := aioHelper("aio-fdsync", file); code != 0 {
				return 2, true
			}
			return 0, true
		}
		f, err := os.OpenFile(file, os.O_WRONLY|os.O_CREATE, 0o644)
		if err != nil {
			return 161, true
		}
		if _, err := unix.Pwritev2(int(f.Fd()), [][]byte{[]byte("durable?\n")}, 0, unix.RWF_DSYNC); err != nil {
			fmt.Fprintln(os.Stderr, "pwritev2:", err)
			return 2, true
		}
		return 0, true
	case "aio-fdsync-dumpable":
		return aioHelper("aio-fdsync", file), true
	}
	return 0, false
}

// dupSyncHelper duplicates an O_DSYNC file (placed at SyncFDBase or
// above) and a plain one, and checks which duplications are refused.
func dupSyncHelper(file string) int {
	f, err := os.OpenFile(file, os.O_WRONLY|os.O_CREATE|unix.O_DSYNC, 0o644)
	if err != nil || f.Fd() < SyncFDBase {
		fmt.Fprintln(os.Stderr, "open:", err)
		return 120
	}
	fd := int(f.Fd())
	refused := []struct {
		name string
		call func() error
	}{
		{"dup2 onto 7", func() error { return unix.Dup2(fd, 7) }},
		{"dup3 onto 8", func() error { return unix.Dup3(fd, 8, unix.O_CLOEXEC) }},
		{"dup", func() error { _, err := unix.Dup(fd); return err }},
		{"F_DUPFD from 0", func() error { _, err := unix.FcntlInt(uintptr(fd), unix.F_DUPFD, 0); return err }},
		{"F_DUPFD_CLOEXEC from 3", func() error { _, err := unix.FcntlInt(uintptr(fd), unix.F_DUPFD_CLOEXEC, 3); return err }},
	}
	for _, c := range refused {
		if err := c.call(); !errors.Is(err, unix.EPERM) {
			fmt.Fprintf(os.Stderr, "%s of an O_DSYNC file: %v, want EPERM\n", c.name, err)
			return 121
		}
	}
	if err := unix.Dup2(fd, 700); err != nil {
		fmt.Fprintln(os.Stderr, "dup2 onto 700:", err)
		return 122
	}
	if n, err := unix.FcntlInt(uintptr(fd), unix.F_DUPFD, 600); err != nil || n < 600 {
		fmt.Fprintln(os.Stderr, "F_DUPFD from 600:", n, err)
		return 123
	}
	// A write through the duplicate at 700 is held (one barrier).
	if _, err := unix.Write(700, []byte("held\n")); err != nil {
		return 124
	}
	// A plain file moved up and back down: nothing to refuse.
	p, err := os.OpenFile(file+".plain", os.O_WRONLY|os.O_CREATE, 0o644)
	if err != nil {
		return 125
	}
	up, err := unix.FcntlInt(p.Fd(), unix.F_DUPFD, 800)
	if err != nil {
		return 126
	}
	if err := unix.Dup2(up, 9); err != nil {
		fmt.Fprintln(os.Stderr, "dup2 of a plain file onto 9:", err)
		return 127
	}
	// Bad descriptors still get the kernel's answer.
	if err := unix.Dup2(fd, -1); !errors.Is(err, unix.EBADF) {
		fmt.Fprintln(os.Stderr, "dup2 onto -1:", err)
		return 128
	}
	return 0
}

// syncFlagsHelper tries to make its file synchronous in each way the
// kernel offers, and checks each is refused while other flags pass.
func syncFlagsHelper(file string) int {
	f, err := os.OpenFile(file, os.O_WRONLY|os.O_CREATE, 0o644)
	if err != nil {
		return 130
	}
	fd := int(f.Fd())
	attr, err := unix.IoctlGetUint32(fd, unix.FS_IOC_GETFLAGS)
	if err != nil {
		fmt.Fprintln(os.Stderr, "FS_IOC_GETFLAGS:", err)
		return 131
	}
	setflags := func(v uint32) error {
		x := int(v)
		_, _, e := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), unix.FS_IOC_SETFLAGS, uintptr(unsafe.Pointer(&x)))
		runtime.KeepAlive(&x)
		if e != 0 {
			return e
		}
		return nil
	}
	if err := setflags(attr); err != nil {
		fmt.Fprintln(os.Stderr, "FS_IOC_SETFLAGS unchanged:", err)
		return 132
	}
	if err := setflags(attr | fsSyncFL); !errors.Is(err, unix.EPERM) {
		fmt.Fprintln(os.Stderr, "FS_IOC_SETFLAGS +S:", err)
		return 133
	}
	if err := setflags(attr | fsDirsyncFL); !errors.Is(err, unix.EPERM) {
		fmt.Fprintln(os.Stderr, "FS_IOC_SETFLAGS +D:", err)
		return 134
	}
	var fsx [28]byte // struct fsxattr
	if _, _, e := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), fsIocFsgetxattr, uintptr(unsafe.Pointer(&fsx[0]))); e != 0 {
		fmt.Fprintln(os.Stderr, "FS_IOC_FSGETXATTR:", e)
		return 135
	}
	binary.LittleEndian.PutUint32(fsx[0:], binary.LittleEndian.Uint32(fsx[0:])|fsXflagSync)
	if _, _, e := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), fsIocFssetxattr, uintptr(unsafe.Pointer(&fsx[0]))); e != unix.EPERM {
		fmt.Fprintln(os.Stderr, "FS_IOC_FSSETXATTR +sync:", e)
		return 136
	}
	atFDCWD := unix.AT_FDCWD
	var fa [32]byte // struct file_attr: fa_xflags first
	binary.LittleEndian.PutUint64(fa[0:], fsXflagSync)
	p, err := unix.BytePtrFromString(file)
	if err != nil {
		return 137
	}
	_, _, e := unix.Syscall6(unix.SYS_FILE_SETATTR, uintptr(atFDCWD), uintptr(unsafe.Pointer(p)), uintptr(unsafe.Pointer(&fa[0])), uintptr(len(fa)), 0, 0)
	if e != unix.EPERM {
		fmt.Fprintln(os.Stderr, "file_setattr +sync:", e)
		return 138
	}
	if got, err := unix.IoctlGetUint32(fd, unix.FS_IOC_GETFLAGS); err != nil || got&(fsSyncFL|fsDirsyncFL) != 0 {
		fmt.Fprintf(os.Stderr, "flags after: %#x %v\n", got, err)
		return 139
	}
	return 0
}

func superviseFdsync(t *testing.T, mode, file string) (barriers int32) {
	t.Helper()
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	t.Setenv("DUET_BARRIER_HELPER", mode)
	t.Setenv("DUET_BARRIER_FILE", file)
	var n atomic.Int32
	if code := supervise(t, counting(&n, nil), self); code != 0 {
		t.Fatalf("%s: helper exit %d", mode, code)
	}
	return n.Load()
}

// A duplicate of an O_SYNC/O_DSYNC file below SyncFDBase would take
// synchronous writes the filter lets through: refused with EPERM; one at
// SyncFDBase or above, and any duplicate of a plain file, is made.
func TestDupOfSyncFileBelowBaseRefused(t *testing.T) {
	f := filepath.Join(t.TempDir(), "f")
	if n := superviseFdsync(t, "dup-sync", f); n != 1 {
		t.Fatalf("%d barriers, want 1 (the write through the duplicate at 700)", n)
	}
}

// GNU dd's oflag=dsync opens its output, then dup2s it onto 1: its
// synchronous writes there returned with no barrier asked. Now dd fails,
// said on stderr, instead of writing unheld.
func TestDdOflagDsyncNotUnheld(t *testing.T) {
	if _, err := exec.LookPath("dd"); err != nil {
		t.Skip("no dd")
	}
	f := filepath.Join(t.TempDir(), "f")
	var n atomic.Int32
	code := supervise(t, counting(&n, nil), "dd", "if=/dev/zero", "of="+f, "bs=4096", "count=4", "oflag=dsync", "status=none")
	st, err := os.Stat(f)
	wrote := err == nil && st.Size() > 0
	if code == 0 || wrote && n.Load() == 0 {
		t.Fatalf("dd oflag=dsync: exit %d, wrote %v, %d barriers: its synchronous writes returned unheld", code, wrote, n.Load())
	}
}

// A descriptor argument with its high half set is, to the kernel, the
// descriptor of its low half: held like it.
func TestSyncWriteWithHighFDBitsHeld(t *testing.T) {
	f := filepath.Join(t.TempDir(), "f")
	if n := superviseFdsync(t, "dsync-highfd", f); n == 0 {
		t.Fatalf("write(fd|1<<32) to an O_DSYNC file returned, %d barriers asked", n)
	}
	prog := filter()
	for _, c := range []struct {
		name string
		nr   uint32
		args []uint64
	}{
		{"write", unix.SYS_WRITE, []uint64{1<<32 | SyncFDBase}},
		{"pwritev", unix.SYS_PWRITEV, []uint64{1<<32 | SyncFDBase}},
		{"sendfile", unix.SYS_SENDFILE, []uint64{1<<32 | SyncFDBase, 3}},
		{"copy_file_range", unix.SYS_COPY_FILE_RANGE, []uint64{3, 0, 1<<32 | SyncFDBase}},
	} {
		if got := run(prog, c.nr, c.args...); got != unix.SECCOMP_RET_USER_NOTIF {
			t.Errorf("%s on descriptor 1<<32|%d: %#x, want notify", c.name, SyncFDBase, got)
		}
	}
	if got := run(prog, unix.SYS_WRITE, 1<<32|1); got != unix.SECCOMP_RET_ALLOW {
		t.Errorf("write on descriptor 1<<32|1: %#x, want allow", got)
	}
}

// chattr +S, +D and their FS_XFLAG_SYNC forms would make writes durable
// on return on any descriptor: refused.
func TestSyncFlagsRefused(t *testing.T) {
	f := filepath.Join(t.TempDir(), "f")
	superviseFdsync(t, "sync-flags", f)
}

// fallocate on an O_DSYNC file is durable on return (ext4, XFS): the
// supervisor makes it and holds it.
func TestFallocateOnSyncFileHeld(t *testing.T) {
	f := filepath.Join(t.TempDir(), "f")
	if n := superviseFdsync(t, "fallocate-dsync", f); n != 1 {
		t.Fatalf("fallocate on an O_DSYNC file: %d barriers, want 1", n)
	}
	if got := run(filter(), unix.SYS_FALLOCATE, 3, 0); got != unix.SECCOMP_RET_ALLOW {
		t.Errorf("fallocate on descriptor 3: %#x, want allow", got)
	}
}

// BTRFS_IOC_SYNC is a syncfs: held as one, then the kernel's own answer.
func TestBtrfsIocSyncHeld(t *testing.T) {
	f := filepath.Join(t.TempDir(), "f")
	if err := os.WriteFile(f, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	if n := superviseFdsync(t, "btrfs-ioc-sync", f); n != 1 {
		t.Fatalf("BTRFS_IOC_SYNC: %d barriers, want 1", n)
	}
	if got := run(filter(), unix.SYS_IOCTL, 3, unix.TCGETS); got != unix.SECCOMP_RET_ALLOW {
		t.Errorf("ioctl TCGETS: %#x, want allow", got)
	}
}

// countingSupervisorEnv makes the test binary a `duet exec` of its own
// helper (DUET_BARRIER_HELPER), appending a line to the named file for
// each barrier.
const countingSupervisorEnv = "DUET_BARRIER_COUNTING_SUPERVISOR"

func countingSupervisor(countFile string) int {
	os.Unsetenv(countingSupervisorEnv)
	self, err := os.Executable()
	if err != nil {
		return 100
	}
	code, err := Exec(context.Background(), self, []string{self}, func(int32) error {
		f, err := os.OpenFile(countFile, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o666)
		if err == nil {
			f.WriteString("barrier\n")
			f.Close()
		}
		return nil
	}, nil)
	if err != nil {
		fmt.Fprintln(os.Stderr, "Exec:", err)
		return 101
	}
	return code
}

// `duet exec` run by a user (no CAP_SYS_PTRACE) supervising a program
// that made itself non-dumpable cannot read its memory or take its
// descriptors: an io_submit of a flush and a pwritev2 with RWF_DSYNC went
// through with no barrier. They now fail (EPERM) unless held.
func TestUnreadableCallerNotReleasedUnheld(t *testing.T) {
	self, dir := nobodyCopy(t, "duet-unreadable-")
	for _, mode := range []string{"aio-fdsync-dumpable", "aio-fdsync-nondumpable", "rwf-dsync-nondumpable"} {
		t.Run(mode, func(t *testing.T) {
			count := filepath.Join(dir, mode+".count")
			var stderr strings.Builder
			cmd := exec.Command(self)
			cmd.Dir = dir
			cmd.Env = append(os.Environ(), countingSupervisorEnv+"="+count, "DUET_BARRIER_HELPER="+mode,
				"DUET_BARRIER_FILE="+filepath.Join(dir, mode+".data"), "TMPDIR="+dir)
			cmd.Stderr = &stderr
			cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 65534, Gid: 65534}}
			err := cmd.Run()
			var ee *exec.ExitError
			if err != nil && !errors.As(err, &ee) {
				t.Fatal(err)
			}
			b, _ := os.ReadFile(count)
			barriers := len(b) / len("barrier\n")
			code := cmd.ProcessState.ExitCode()
			switch {
			case code == 0 && barriers > 0:
				// held
			case code == 2 && mode != "aio-fdsync-dumpable" && strings.Contains(stderr.String(), "cannot read the descriptors or memory"):
				// refused, and said why
			default:
				t.Fatalf("%s: exit %d, %d barriers: the durability call completed unheld\n%s", mode, code, barriers, stderr.String())
			}
		})
	}
}
