package barrier

import (
	"bufio"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// supervisorHelper plays the daemon (DUET_BARRIER_SUPERVISOR): it starts
// `sh -c script` supervised, as duet starts a service (its own process
// group, the parent-death signal, GroupEnv unless DUET_BARRIER_NOGROUP),
// says "started" and waits to be killed.
func supervisorHelper(script string) int {
	runtime.LockOSThread() // the parent-death signal follows the forking thread
	self, err := os.Executable()
	if err != nil {
		return 100
	}
	_, err = Start(self, []string{"/bin/sh", "-c", script}, func(int32) error { return nil }, nil, func(c *exec.Cmd) {
		c.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
		c.Env = os.Environ()
		if os.Getenv("DUET_BARRIER_NOGROUP") == "" {
			c.Env = append(c.Env, GroupEnv+"="+strconv.Itoa(os.Getpid()))
		}
	})
	if err != nil {
		return 101
	}
	os.Stdout.WriteString("started\n")
	select {}
}

// A service's whole process group dies with the daemon, also what the
// shell forked (dash does not exec the last command), and the service
// runs under the filter. Without GroupEnv the forked command outlives a
// SIGKILLed daemon: the test checks it can see that.
func TestServiceGroupDiesWithSupervisor(t *testing.T) {
	for _, group := range []bool{true, false} {
		sup, pidFile := startSupervisor(t, group)
		pid := waitPidFile(t, pidFile)
		if status, _ := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/status"); !strings.Contains(string(status), "Seccomp:\t2") {
			t.Errorf("group %v: the service's command runs without the filter:\n%s", group, status)
		}
		sup.Process.Kill()
		sup.Wait()
		gone := waitGone(pid, 5*time.Second)
		if !gone {
			unix.Kill(pid, unix.SIGKILL)
		}
		switch {
		case group && !gone:
			t.Errorf("the service's command (pid %d) outlived its SIGKILLed supervisor", pid)
		case !group && gone:
			t.Errorf("without the group the forked command died too: the test cannot tell the two apart")
		}
	}
}

// The supervised child runs the service's group from whichever thread Go
// put it on; the kernel keeps a parent-death signal per thread, and the
// daemon's (SIGKILL, set at fork) is the child's main thread's. Here the
// child runs off its main thread on purpose (DUET_BARRIER_CHILD_OFF_MAIN):
// with SIGKILL left on the main thread the child died at once when the
// supervisor did, and the service's command lived on (in the test above,
// once in 20 runs under load, where Go had moved the goroutine).
func TestGroupChildOffMainThread(t *testing.T) {
	sup, pidFile := startSupervisor(t, true, childOffMainEnv+"=1")
	pid := waitPidFile(t, pidFile)
	sup.Process.Kill()
	sup.Wait()
	if !waitGone(pid, 5*time.Second) {
		unix.Kill(pid, unix.SIGKILL)
		t.Errorf("the service's command (pid %d) outlived its SIGKILLed supervisor", pid)
	}
}

func waitPidFile(t *testing.T, path string) int {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		b, _ := os.ReadFile(path)
		if pid, err := strconv.Atoi(strings.TrimSpace(string(b))); err == nil && pid > 0 {
			return pid
		}
		if time.Now().After(deadline) {
			t.Fatalf("no pid in %s after 10 s", path)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// waitGone waits until pid has exited (gone, or a zombie nobody reaped).
func waitGone(pid int, timeout time.Duration) bool {
	deadline := time.Now().Add(timeout)
	for time.Now().Before(deadline) {
		b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
		if err != nil {
			return true
		}
		if f := strings.Fields(string(b)); len(f) > 2 && f[2] == "Z" {
			return true
		}
		time.Sleep(20 * time.Millisecond)
	}
	return false
}

// A SIGUSR2 that does not come from the supervisor's death (an operator
// signalling the pid duet status shows, a program signalling its
// parent) must not kill the service: its supervisor is alive.
func TestServiceGroupSurvivesStraySIGUSR2(t *testing.T) {
	sup, pidFile := startSupervisor(t, true)
	defer func() {
		sup.Process.Kill()
		sup.Wait()
	}()
	pid := waitPidFile(t, pidFile)
	// The group's leader is the supervised child (the pid status shows).
	leader, err := unix.Getpgid(pid)
	if err != nil {
		t.Fatal(err)
	}
	if err := unix.Kill(leader, unix.SIGUSR2); err != nil {
		t.Fatal(err)
	}
	if waitGone(pid, 2*time.Second) {
		t.Fatalf("a SIGUSR2 sent to the service's leader (pid %d) killed the service while its supervisor (pid %d) runs", leader, sup.Process.Pid)
	}
	unix.Kill(pid, unix.SIGKILL)
}

// startSupervisor starts the supervisor helper (with or without GroupEnv)
// running `sleep 300` forked by sh; the sleep's pid lands in pidFile.
func startSupervisor(t *testing.T, group bool, env ...string) (sup *exec.Cmd, pidFile string) {
	t.Helper()
	pidFile = filepath.Join(t.TempDir(), "pid")
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	sup = exec.Command(self)
	sup.Env = append(os.Environ(), "DUET_BARRIER_SUPERVISOR=sleep 300 & echo $! > "+pidFile+"; wait")
	if !group {
		sup.Env = append(sup.Env, "DUET_BARRIER_NOGROUP=1")
	}
	sup.Env = append(sup.Env, env...)
	out, err := sup.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := sup.Start(); err != nil {
		t.Fatal(err)
	}
	if line, _ := bufio.NewReader(out).ReadString('\n'); line != "started\n" {
		sup.Process.Kill()
		sup.Wait()
		t.Fatalf("supervisor helper said %q", line)
	}
	return sup, pidFile
}
