package barrier

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// execHelper plays `duet exec` (DUET_BARRIER_EXEC): it runs `sh -c script`
// with Exec, as the CLI does, and exits with its status. With
// DUET_BARRIER_WAIT=forever its barrier never confirms a durability call.
func execHelper(script string) int {
	self, err := os.Executable()
	if err != nil {
		return 100
	}
	wait := func(int32) error { return nil }
	if os.Getenv("DUET_BARRIER_WAIT") == "forever" {
		wait = func(int32) error { select {} }
	}
	code, err := Exec(context.Background(), self, []string{"/bin/sh", "-c", script}, wait, nil)
	if err != nil {
		return 101
	}
	return code
}

// When `duet exec` is killed, its command and what the command started
// must not see ENOSYS from a durability call (the kernel's answer once the
// listener is closed): a call it held waits until the process is killed,
// a later one fails with EIO, and every process under the command is
// killed, also one its shell forked and no longer waits for. On the old
// code `duet exec` held the only copy of the listener and nobody killed
// anything: the loop's fdatasync returned "function not implemented" and
// the shell's other child lived on.
func TestExecCommandNeverSeesENOSYSAfterExecDies(t *testing.T) {
	for _, wait := range []string{"forever", "none"} {
		t.Run("barrier-"+wait, func(t *testing.T) { execDies(t, wait) })
	}
}

func execDies(t *testing.T, wait string) {
	dir := t.TempDir()
	file, result := filepath.Join(dir, "data"), filepath.Join(dir, "result")
	pidFile, sleepFile := filepath.Join(dir, "pid"), filepath.Join(dir, "sleep")
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	stderr, err := os.Create(filepath.Join(dir, "stderr"))
	if err != nil {
		t.Fatal(err)
	}
	defer stderr.Close()
	sup := exec.Command(self)
	sup.Env = append(os.Environ(), "DUET_BARRIER_WAIT="+wait,
		"DUET_BARRIER_EXEC=DUET_BARRIER_EXEC= '"+self+"' & sleep 300 & echo $! > "+sleepFile+"; wait",
		"DUET_BARRIER_HELPER=fdatasync-loop", "DUET_BARRIER_FILE="+file,
		"DUET_BARRIER_RESULT="+result, "DUET_BARRIER_PIDFILE="+pidFile)
	// A file, not a pipe: Wait would wait for every process holding it.
	sup.Stderr = stderr
	if err := sup.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() {
		sup.Process.Kill()
		sup.Wait() // a second Wait only says so
	}()
	pid, sleeper := waitPidFile(t, pidFile), waitPidFile(t, sleepFile)
	// Whatever failed, they go.
	defer unix.Kill(pid, unix.SIGKILL)
	defer unix.Kill(sleeper, unix.SIGKILL)
	deadline := time.Now().Add(10 * time.Second)
	for b, _ := os.ReadFile(result); string(b) != "calling\n"; b, _ = os.ReadFile(result) {
		if time.Now().After(deadline) {
			t.Fatalf("the helper wrote %q, not \"calling\", in 10 s", b)
		}
		time.Sleep(10 * time.Millisecond)
	}
	time.Sleep(50 * time.Millisecond) // into the calls
	sup.Process.Kill()
	sup.Wait()
	for _, p := range []struct {
		pid  int
		what string
	}{{pid, "the fdatasync loop"}, {sleeper, "the sleep the shell forked"}} {
		if !waitGone(p.pid, 5*time.Second) {
			t.Errorf("%s (pid %d) outlived its SIGKILLed duet exec by 5 s", p.what, p.pid)
		}
	}
	b, _ := os.ReadFile(result)
	switch got := string(b); got {
	case "calling\n", "calling\nreturned: input/output error\n":
	default:
		t.Errorf("after duet exec died a durability call returned %q; want nothing (held until killed) or EIO", strings.TrimPrefix(got, "calling\n"))
	}
	t.Logf("the loop's result: %q", b)
	if t.Failed() {
		log, _ := os.ReadFile(stderr.Name())
		t.Logf("stderr:\n%s", log)
	}
}
