package barrier

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// handleWithoutDACOverride runs as uid 0 holding CAP_DAC_READ_SEARCH but
// not CAP_DAC_OVERRIDE (a hardened root service: CapabilityBoundingSet=
// CAP_DAC_READ_SEARCH), and opens by handle, O_WRONLY|O_DSYNC, a file whose
// mode (0444) gives its owner root no write permission. The kernel refuses
// it (EACCES): the open's permission checks are the caller's. Exit 0 when
// refused, 160 when the open succeeded (and it wrote through it).
func handleWithoutDACOverride(file string) int {
	runtime.LockOSThread() // capabilities are per thread; the open runs here
	h, _, err := unix.NameToHandleAt(unix.AT_FDCWD, file, 0)
	if err != nil {
		return 161
	}
	mount, err := unix.Open(filepath.Dir(file), unix.O_RDONLY|unix.O_DIRECTORY, 0)
	if err != nil {
		return 162
	}
	hdr := unix.CapUserHeader{Version: unix.LINUX_CAPABILITY_VERSION_3}
	var data [2]unix.CapUserData
	if err := unix.Capget(&hdr, &data[0]); err != nil {
		return 163
	}
	if data[0].Effective&(1<<capDACReadSearch) == 0 {
		return 77
	}
	const capDACOverride = 1
	data[0].Effective &^= 1 << capDACOverride
	if err := unix.Capset(&hdr, &data[0]); err != nil {
		return 164
	}
	// The control: a plain open for writing is refused (not trapped).
	if fd, err := unix.Open(file, unix.O_WRONLY, 0); err == nil {
		unix.Close(fd)
		fmt.Fprintln(os.Stderr, "CAP_DAC_OVERRIDE still effective")
		return 165
	}
	fd, err := unix.OpenByHandleAt(mount, h, unix.O_WRONLY|unix.O_DSYNC)
	if err != nil {
		fmt.Fprintln(os.Stderr, "open_by_handle_at:", err)
		return 0
	}
	unix.Write(fd, []byte("written by a caller that may not write it\n"))
	return 160
}

// TestOpenByHandleSyncKeepsCallersPermissionChecks: the supervisor opened
// a file by handle for a root caller holding CAP_DAC_READ_SEARCH, with its
// own (full) capabilities. A root caller without CAP_DAC_OVERRIDE may not
// write a file whose mode denies it: unsupervised, open_by_handle_at
// fails with EACCES; supervised, the supervisor's open succeeded and the
// caller got a writable descriptor (O_TRUNC would truncate it too). Such
// a caller's open now goes through to the kernel.
func TestOpenByHandleSyncKeepsCallersPermissionChecks(t *testing.T) {
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	file := filepath.Join(t.TempDir(), "f")
	if err := os.WriteFile(file, []byte("root's, read-only\n"), 0o444); err != nil {
		t.Fatal(err)
	}
	os.Chmod(file, 0o444)
	t.Setenv("DUET_BARRIER_HELPER", "handle-without-dac-override")
	t.Setenv("DUET_BARRIER_FILE", file)
	var n atomic.Int32
	switch code := supervise(t, counting(&n, nil), self); code {
	case 0:
	case 77:
		t.Skip("no CAP_DAC_READ_SEARCH")
	case 160:
		b, _ := os.ReadFile(file)
		t.Fatalf("a uid-0 caller without CAP_DAC_OVERRIDE opened a mode-0444 file for writing through open_by_handle_at "+
			"(the kernel says EACCES): the supervisor opened it with its own capabilities; the file now holds %q", b)
	default:
		t.Fatalf("helper exit %d", code)
	}
}

// spliceFromFIFO opens file O_DSYNC (at SyncFDBase or above) and splices
// into it from fifo, empty: the call blocks until the writer writes.
func spliceFromFIFO(fifo, file, pidFile string) int {
	dst, err := os.OpenFile(file, os.O_WRONLY|os.O_CREATE|unix.O_DSYNC, 0o644)
	if err != nil || dst.Fd() < SyncFDBase {
		return 170
	}
	in, err := unix.Open(fifo, unix.O_RDONLY, 0)
	if err != nil {
		return 171
	}
	if err := os.WriteFile(pidFile, []byte(strconv.Itoa(os.Getpid())), 0o644); err != nil {
		return 172
	}
	for {
		if _, err := unix.Splice(in, nil, int(dst.Fd()), nil, 4096, 0); err != nil && err != unix.EINTR {
			return 173
		}
	}
}

// TestSpliceFromPipeEndsWithItsCaller: a program splices from an empty
// pipe into its O_DSYNC file and is killed while it waits. The kernel's
// splice ends with it: the pipe has no reader left (its writer gets EPIPE)
// and nothing more reaches the file. The supervisor's emulated splice, on
// its own duplicates of both descriptors, goes on waiting after the caller
// was gone; it kept the pipe's read end open (the writer was never told),
// and the next bytes written were taken from the pipe and written into the
// file by nobody's call, after the program died. It now waits in steps and
// gives up once the call is gone.
func TestSpliceFromPipeEndsWithItsCaller(t *testing.T) {
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	fifo, file, pidFile := filepath.Join(dir, "fifo"), filepath.Join(dir, "f"), filepath.Join(dir, "pid")
	if err := unix.Mkfifo(fifo, 0o600); err != nil {
		t.Fatal(err)
	}
	t.Setenv("DUET_BARRIER_HELPER", "splice-from-fifo")
	t.Setenv("DUET_BARRIER_FIFO", fifo)
	t.Setenv("DUET_BARRIER_FILE", file)
	t.Setenv("DUET_BARRIER_PIDFILE", pidFile)
	var n atomic.Int32
	exited := make(chan int, 1)
	go func() {
		code, _ := Exec(context.Background(), self, []string{self}, counting(&n, nil), nil)
		exited <- code
	}()
	w, err := os.OpenFile(fifo, os.O_WRONLY, 0) // blocks until the helper opens it
	if err != nil {
		t.Fatal(err)
	}
	defer w.Close()
	pid := waitPidFile(t, pidFile)
	time.Sleep(500 * time.Millisecond) // the helper waits in splice
	unix.Kill(pid, unix.SIGKILL)
	select {
	case <-exited:
	case <-time.After(10 * time.Second):
		t.Fatal("the supervised helper did not end after SIGKILL")
	}
	if !waitGone(pid, 5*time.Second) {
		t.Fatal("the helper is still there")
	}
	// The supervisor may hold the pipe for one more wait step (spliceStep)
	// before it sees the call gone: the writer gets EPIPE once it lets go,
	// and what it wrote before that must not reach the file.
	var werr error
	for deadline := time.Now().Add(3 * time.Second); time.Now().Before(deadline); time.Sleep(10 * time.Millisecond) {
		if _, werr = w.Write([]byte("late: written after the reader died\n")); werr != nil {
			break
		}
	}
	time.Sleep(100 * time.Millisecond)
	got, _ := os.ReadFile(file)
	if len(got) != 0 || !errors.Is(werr, unix.EPIPE) {
		t.Fatalf("after the splicing program was killed, writes to its pipe ended with %v (want EPIPE: no reader left) "+
			"and its O_DSYNC file holds %q (want nothing): the supervisor's splice outlived its caller", werr, got)
	}
}

// suidCopy, as user nobody, opens file (setuid, writable by all) with
// O_DSYNC and fills it with copy_file_range from a file of its own.
func suidCopy(file string) int {
	src, err := os.CreateTemp(filepath.Dir(file), "src")
	if err != nil {
		return 180
	}
	if _, err := src.WriteString(copyPayload); err != nil {
		return 181
	}
	if err := unix.Setgid(65534); err != nil {
		return 182
	}
	if err := unix.Setuid(65534); err != nil {
		return 183
	}
	dst, err := os.OpenFile(file, os.O_WRONLY|unix.O_DSYNC, 0)
	if err != nil {
		fmt.Fprintln(os.Stderr, "open:", err)
		return 184
	}
	if os.Getenv("DUET_BARRIER_SUID_WRITE") != "" {
		if _, err := dst.Write([]byte(copyPayload)); err != nil {
			return 186
		}
		return 0
	}
	off := int64(0)
	if _, err := unix.CopyFileRange(int(src.Fd()), &off, int(dst.Fd()), nil, len(copyPayload), 0); err != nil {
		fmt.Fprintln(os.Stderr, "copy_file_range:", err)
		return 185
	}
	return 0
}

// TestKernelCopyByUnprivilegedCallerDropsSetuid: a write into a setuid
// file by a process without CAP_FSETID clears the setuid bit (the kernel's
// file_remove_privs): whoever can write a setuid-root program must not
// leave it setuid with their bytes in it. The supervisor made the
// caller's copy into an O_DSYNC file itself, as root with CAP_FSETID: the
// bit stayed, and the program held the caller's bytes, still setuid root.
// Plain write(2) into such a file, which the supervisor also makes, did
// the same. It now clears the bits first for a caller without CAP_FSETID
// (killPrivs).
func TestKernelCopyByUnprivilegedCallerDropsSetuid(t *testing.T) {
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		mode string
		bits os.FileMode // the file's special bits, with 0o777, or 0o666 for setgid (not group executable)
	}{{"copy_file_range", os.ModeSetuid}, {"write", os.ModeSetuid}, {"write", os.ModeSetgid}} {
		mode := c.mode
		t.Run(fmt.Sprintf("%s %v", mode, c.bits), func(t *testing.T) {
			dir, err := os.MkdirTemp("", "duet-suid") // reachable by nobody
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { os.RemoveAll(dir) })
			os.Chmod(dir, 0o777)
			file := filepath.Join(dir, "prog")
			if err := os.WriteFile(file, []byte("#!/bin/sh\n"), 0o755); err != nil {
				t.Fatal(err)
			}
			perm := os.FileMode(0o777)
			if c.bits == os.ModeSetgid {
				// Not group executable: the kernel clears it for a
				// writer outside the file's group (root's).
				perm = 0o666
			}
			if err := os.Chmod(file, perm|c.bits); err != nil {
				t.Fatal(err)
			}
			t.Setenv("DUET_BARRIER_HELPER", "suid-copy")
			t.Setenv("DUET_BARRIER_FILE", file)
			if mode == "write" {
				t.Setenv("DUET_BARRIER_SUID_WRITE", "1")
			}
			var n atomic.Int32
			if code := supervise(t, counting(&n, nil), self); code != 0 {
				t.Fatalf("helper exit %d", code)
			}
			st, err := os.Stat(file)
			if err != nil {
				t.Fatal(err)
			}
			b, _ := os.ReadFile(file)
			if n.Load() == 0 {
				t.Fatal("the write was not held: the test sees nothing")
			}
			if st.Mode()&c.bits != 0 {
				t.Fatalf("after a %s into it by uid 65534 (barrier calls %d), the root-owned file is %v and holds %q: "+
					"the %v bit the kernel clears on such a write is kept", mode, n.Load(), st.Mode(), b, c.bits)
			}
		})
	}
}
