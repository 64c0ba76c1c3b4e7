package barrier

import (
	"fmt"
	"os"
	"os/exec"
	"strings"
	"syscall"
	"testing"

	"golang.org/x/sys/unix"
)

// TestOpenAsLeavesMainThreadAlone: openAs takes the caller's filesystem
// credentials on a locked thread that exits afterwards, but a goroutine
// that exits locked to the process's main thread does not end it: the
// runtime parks it, with the caller's fsuid, and /proc/<pid>/status shows
// the main thread's. The race pass of make test then failed
// TestSyncOpenOfDirectoryIgnoresMode, which opens as its own process:
// an earlier test's caller running as nobody had left the main thread
// with fsuid 65534, and the open of a root-owned 0700 directory got
// EACCES. Many opens as nobody must leave the process's fsuid at 0.
func TestOpenAsLeavesMainThreadAlone(t *testing.T) {
	if os.Getuid() != 0 {
		t.Skip("needs root: the caller runs as nobody")
	}
	cmd := exec.Command("sleep", "30")
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 65534, Gid: 65534}}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { cmd.Process.Kill(); cmd.Wait() }()
	base := fmt.Sprintf("/proc/%d/root", cmd.Process.Pid)
	done := make(chan error, 400)
	for range 400 {
		go func() {
			fd, err := openAs(cmd.Process.Pid, base, "/", true, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_DSYNC, 0)
			if err == nil {
				unix.Close(fd)
			}
			done <- err
		}()
	}
	for range 400 {
		if err := <-done; err != nil {
			t.Fatalf("open as nobody: %v", err)
		}
	}
	b, err := os.ReadFile("/proc/self/status")
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range strings.Split(string(b), "\n") {
		if f := strings.Fields(l); len(f) == 5 && f[0] == "Uid:" && f[4] != "0" {
			t.Fatalf("after opens as nobody, the process's main thread keeps filesystem uid %s (%s)", f[4], l)
		}
	}
}
