package barrier

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"

	"golang.org/x/sys/unix"
)

// procSelfHelperEnv selects this file's supervised program; it runs from
// init, before TestMain, in the process RunChild execs.
const procSelfHelperEnv = "DUET_PROC_SELF_HELPER"

// procSelfFD is the descriptor number the program's file and the
// supervisor's decoy both have.
const procSelfFD = 100

func init() {
	if os.Getenv(procSelfHelperEnv) == "" || len(os.Args) > 1 && os.Args[1] == ChildCommand {
		return
	}
	os.Exit(procSelfDsync(os.Getenv("DUET_BARRIER_FILE")))
}

// procSelfDsync opens its own file again through /proc/self/fd (as
// /dev/stdout, /dev/fd/N do) with O_DSYNC and appends a record. Exit 0:
// the record is in its file.
func procSelfDsync(file string) int {
	f, err := os.OpenFile(file, os.O_RDWR|os.O_CREATE, 0o644)
	if err != nil {
		return 110
	}
	if err := unix.Dup2(int(f.Fd()), procSelfFD); err != nil {
		return 111
	}
	fd, err := unix.Open(fmt.Sprintf("/proc/self/fd/%d", procSelfFD), unix.O_WRONLY|unix.O_APPEND|unix.O_DSYNC, 0)
	if err != nil {
		fmt.Fprintln(os.Stderr, "open:", err)
		return 112
	}
	if _, err := unix.Write(fd, []byte("committed\n")); err != nil {
		fmt.Fprintln(os.Stderr, "write:", err)
		return 113
	}
	got, _ := os.ReadFile(file)
	if !strings.Contains(string(got), "committed") {
		fmt.Fprintf(os.Stderr, "O_DSYNC write returned, but its own file holds %q\n", got)
		return 2
	}
	return 0
}

// TestSyncOpenThroughProcSelfOpensCallersFile: an O_SYNC/O_DSYNC open of a
// path through /proc/self (/dev/stdout, /dev/fd/N, /proc/self/fd/N) was
// made by the supervisor through /proc/<pid>/root/..., where "self" is the
// supervisor: the program got the supervisor's file, and its "durable"
// write landed there (a review, forty-second session; failed on 7f8fbb8).
// Such an open is now the kernel's, in the caller, not held (warned).
func TestSyncOpenThroughProcSelfOpensCallersFile(t *testing.T) {
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	decoy, err := os.Create(filepath.Join(dir, "supervisor-file"))
	if err != nil {
		t.Fatal(err)
	}
	defer decoy.Close()
	if err := unix.Dup2(int(decoy.Fd()), procSelfFD); err != nil {
		t.Fatal(err)
	}
	defer unix.Close(procSelfFD)
	t.Setenv(procSelfHelperEnv, "proc-self-dsync")
	t.Setenv("DUET_BARRIER_FILE", filepath.Join(dir, "wal"))
	var n atomic.Int32
	code := supervise(t, counting(&n, nil), self)
	got, _ := os.ReadFile(decoy.Name())
	if code != 0 || len(got) > 0 {
		t.Fatalf("program exit %d (0: its record is in its own file); the supervisor's file at descriptor %d now holds %q; %d barrier calls",
			code, procSelfFD, got, n.Load())
	}
}

// TestSyncOpenOfDirectoryIgnoresMode: O_TMPFILE includes O_DIRECTORY, and
// a directory's O_DSYNC open with a mode argument (os.OpenFile passes its
// perm every time) got the mode, which openat2 refuses (EINVAL) where
// open(2) ignores it (a review of the fix above).
func TestSyncOpenOfDirectoryIgnoresMode(t *testing.T) {
	dir := t.TempDir()
	fd, err := openAs(os.Getpid(), fmt.Sprintf("/proc/%d/root", os.Getpid()), dir, true, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_DSYNC, 0o644)
	if err != nil {
		t.Fatalf("an O_DIRECTORY|O_DSYNC open of %s with mode 0644: %v", dir, err)
	}
	unix.Close(fd)
}
