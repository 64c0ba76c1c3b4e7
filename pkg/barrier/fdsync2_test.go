package barrier

// Tests from a second review of fdsync.go (fortieth session).

import (
	"encoding/binary"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"unsafe"

	"golang.org/x/sys/unix"
)

func fdsyncHelper2(mode, file string) (int, bool) {
	switch mode {
	case "resvsp-dsync":
		f, err := os.OpenFile(file, os.O_WRONLY|os.O_CREATE|unix.O_DSYNC, 0o644)
		if err != nil || f.Fd() < SyncFDBase {
			return 130, true
		}
		var sr [48]byte // struct space_resv: l_type, l_whence, l_start, l_len...
		binary.LittleEndian.PutUint64(sr[8:], 0)
		binary.LittleEndian.PutUint64(sr[16:], 1<<20)
		if _, _, e := unix.Syscall(unix.SYS_IOCTL, f.Fd(), fsIocResvsp64, uintptr(unsafe.Pointer(&sr[0]))); e != 0 {
			fmt.Fprintln(os.Stderr, "FS_IOC_RESVSP64:", e)
			return 131, true
		}
		var st unix.Stat_t
		unix.Fstat(int(f.Fd()), &st)
		fmt.Fprintf(os.Stderr, "FS_IOC_RESVSP64 on an O_DSYNC file: %d blocks allocated\n", st.Blocks)
		return 0, true
	case "nondumpable-plain":
		// No O_SYNC/O_DSYNC file anywhere: a pipe at 600, a plain openat2.
		if err := unix.Prctl(unix.PR_SET_DUMPABLE, 0, 0, 0, 0); err != nil {
			return 140, true
		}
		var p [2]int
		if err := unix.Pipe(p[:]); err != nil {
			return 141, true
		}
		if err := unix.Dup2(p[1], 600); err != nil { // source 4-ish: not trapped
			return 142, true
		}
		code := 0
		if _, err := unix.Write(600, []byte("x")); err != nil {
			fmt.Fprintln(os.Stderr, "write to a pipe at 600:", err)
			code |= 4
		}
		if err := unix.Dup2(600, 9); err != nil {
			fmt.Fprintln(os.Stderr, "dup2(600, 9) of a pipe:", err)
			code |= 8
		}
		// openat2's flags are in memory: unread, it may be an O_SYNC
		// open, placed below 512. It fails closed (EPERM).
		if fd, err := unix.Openat2(unix.AT_FDCWD, file, &unix.OpenHow{Flags: unix.O_RDONLY | unix.O_CLOEXEC}); err == nil {
			unix.Close(fd)
			fmt.Fprintln(os.Stderr, "openat2 of a process the supervisor cannot read: not refused")
			code |= 16
		}
		return code, true
	}
	return 0, false
}

// The preallocation ioctls (FS_IOC_RESVSP/RESVSP64, UNRESVSP, ZERO_RANGE:
// vfs_fallocate through ioctl_preallocate) on an O_DSYNC file are as
// durable on return as fallocate (XFS: XFS_PREALLOC_SYNC): made by the
// supervisor and held, as fallocate is. BTRFS_IOC_START_SYNC + WAIT_SYNC
// is a commit, as BTRFS_IOC_SYNC is: WAIT_SYNC is held.
func TestPreallocAndBtrfsWaitSyncHeld(t *testing.T) {
	prog := filter()
	for _, c := range []struct {
		name string
		cmd  uint64
	}{{"FS_IOC_RESVSP64", fsIocResvsp64}, {"FS_IOC_ZERO_RANGE", fsIocZeroRange}, {"BTRFS_IOC_WAIT_SYNC", btrfsIocWaitSync}} {
		if got := run(prog, unix.SYS_IOCTL, SyncFDBase, c.cmd); got != unix.SECCOMP_RET_USER_NOTIF {
			t.Errorf("ioctl %s: %#x, want notify", c.name, got)
		}
	}
	f := filepath.Join(t.TempDir(), "f")
	if n := superviseFdsync(t, "resvsp-dsync", f); n == 0 {
		t.Errorf("FS_IOC_RESVSP64 on an O_DSYNC file: returned with %d barriers", n)
	}
}

// A supervisor that cannot read a caller (duet exec run by a user, the
// caller non-dumpable; or another uid; or no CAP_SYS_PTRACE) fails closed
// only where a call may be a durability point: a write to a pipe numbered
// 512 or above and a dup2 of it run while no O_SYNC file was ever placed
// (a review found them refused); an openat2, whose flags it cannot read,
// fails with EPERM.
func TestUnreadableCallerPlainCallsRun(t *testing.T) {
	self, dir := nobodyCopy(t, "duet-plain-")
	plain := filepath.Join(dir, "plain")
	if err := os.WriteFile(plain, []byte("x"), 0o644); err != nil {
		t.Fatal(err)
	}
	var stderr strings.Builder
	cmd := exec.Command(self)
	cmd.Dir = dir
	cmd.Env = append(os.Environ(), countingSupervisorEnv+"="+filepath.Join(dir, "count"), "DUET_BARRIER_HELPER=nondumpable-plain",
		"DUET_BARRIER_FILE="+plain, "TMPDIR="+dir)
	cmd.Stderr = &stderr
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 65534, Gid: 65534}}
	cmd.Run()
	if code := cmd.ProcessState.ExitCode(); code != 0 {
		t.Fatalf("exit %d (bits 4: write to a pipe at 600 refused, 8: dup2(600, 9) refused, 16: openat2 unread yet run)\n%s", code, stderr.String())
	}
}
