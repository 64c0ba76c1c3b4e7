package barrier

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
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
	code, err := Exec(context.Background(), self, []string{"/bin/sh", "-c", script}, helperBarrier(), nil)
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
	waitCalling(t, result)
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

// The tests below came from a review of the first version of
// runExecLeader; each failed on it.

// execLoop starts the exec helper (playing `duet exec`) whose shell runs
// the fdatasync loop as `prefix 'self' & then` (prefix: setsid, or
// nothing; then: wait, or exit), and waits until the loop is calling. It
// returns duet exec, the loop's pid and its result file.
func execLoop(t *testing.T, wait, prefix, then string, setup func(*exec.Cmd)) (sup *exec.Cmd, loop int, result string) {
	t.Helper()
	dir := t.TempDir()
	file, pidFile := filepath.Join(dir, "data"), filepath.Join(dir, "pid")
	result = filepath.Join(dir, "result")
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	sup = exec.Command(self)
	sup.Env = append(os.Environ(), "DUET_BARRIER_WAIT="+wait,
		"DUET_BARRIER_EXEC=DUET_BARRIER_EXEC= "+prefix+" '"+self+"' & "+then,
		"DUET_BARRIER_HELPER=fdatasync-loop", "DUET_BARRIER_FILE="+file,
		"DUET_BARRIER_RESULT="+result, "DUET_BARRIER_PIDFILE="+pidFile)
	if setup != nil {
		setup(sup)
	}
	if err := sup.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		sup.Process.Kill()
		sup.Wait()
	})
	loop = waitPidFile(t, pidFile)
	t.Cleanup(func() { unix.Kill(loop, unix.SIGKILL) })
	waitCalling(t, result)
	return sup, loop, result
}

// checkLoopKilledWithoutENOSYS fails unless the loop is gone within 5 s and never got
// anything but EIO (or nothing) from a durability call.
func checkLoopKilledWithoutENOSYS(t *testing.T, loop int, result string) {
	t.Helper()
	if !waitGone(loop, 5*time.Second) {
		t.Errorf("the fdatasync loop (pid %d) outlived its SIGKILLed duet exec by 5 s", loop)
	}
	checkNoENOSYS(t, result)
}

func checkNoENOSYS(t *testing.T, result string) {
	t.Helper()
	b, _ := os.ReadFile(result)
	switch got := string(b); got {
	case "calling\n", "calling\nreturned: input/output error\n":
	default:
		t.Errorf("a durability call returned %q; want nothing (held until killed) or EIO", strings.TrimPrefix(got, "calling\n"))
	}
}

// `kill -9 %1`, systemd's or a terminal's kill of the job's process group:
// duet exec and the command die at once. The leader gets both its
// parent-death signal and the command's exit; whichever its select picks
// first, what the command started in another session (a daemon) must be
// killed and must never see ENOSYS.
func TestExecDescendantsDieWhenExecAndCommandDieTogether(t *testing.T) {
	for i := 0; i < 8; i++ {
		sup, loop, result := execLoop(t, "none", "setsid", "wait", func(c *exec.Cmd) {
			c.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
		})
		unix.Kill(-sup.Process.Pid, unix.SIGKILL)
		sup.Wait()
		checkLoopKilledWithoutENOSYS(t, loop, result)
		if t.Failed() {
			t.Fatalf("failed on round %d", i+1)
		}
	}
}

// duet exec's stderr is a pipe whose reader died with it (`duet exec ...
// 2>&1 | logger`, the whole job killed): the leader's first act on duet
// exec's death was a message on stderr, before it served or killed
// anything, and a broken pipe on fd 2 kills a Go program (SIGPIPE).
func TestExecLeaderKillsEvenWhenStderrIsABrokenPipe(t *testing.T) {
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	sup, loop, result := execLoop(t, "forever", "", "wait", func(c *exec.Cmd) { c.Stderr = w })
	w.Close()
	r.Close() // the reader is gone
	sup.Process.Kill()
	sup.Wait()
	checkLoopKilledWithoutENOSYS(t, loop, result)
}

// `nohup duet exec -- cmd`, or `duet exec -- cmd &` in a script (sh
// ignores SIGINT and SIGQUIT for a background job without job control):
// the command inherited the ignored SIGHUP/SIGINT when it was exec'd. The
// leader's signal.Notify installs handlers, which exec resets to the
// default: the command now dies of the signal it was meant to ignore.
func TestExecKeepsIgnoredSignalsIgnored(t *testing.T) {
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	for _, sig := range []string{"HUP", "INT"} {
		c := exec.Command("/bin/sh", "-c", `trap '' `+sig+`; exec "$0"`, self)
		c.Env = append(os.Environ(), "DUET_BARRIER_EXEC=kill -"+sig+" $$; exit 7")
		err := c.Run()
		if code := c.ProcessState.ExitCode(); code != 7 {
			t.Errorf("SIG%s ignored by duet exec's caller: the command got it (%v); want it ignored, exit 7", sig, err)
		}
	}
}

// The command exits and leaves a process behind under the filter (`sh -c
// 'daemon &'`): duet exec waits for it too, its durability calls still
// answered, and killed then, the process is killed, never left with
// ENOSYS. In the first version the leader exited with the command, and the
// process lost the last listener.
func TestExecWaitsForWhatTheCommandLeftBehind(t *testing.T) {
	sup, loop, result := execLoop(t, "none", "", "exit 3", nil)
	exited := make(chan error, 1)
	go func() { exited <- sup.Wait() }()
	select {
	case err := <-exited:
		t.Fatalf("duet exec returned (%v) while a process its command started still runs under the filter", err)
	case <-time.After(300 * time.Millisecond):
	}
	checkNoENOSYS(t, result)
	sup.Process.Kill()
	<-exited
	checkLoopKilledWithoutENOSYS(t, loop, result)
}

// Once the command and what it left behind have exited, duet exec exits
// with the command's status.
func TestExecExitsWithTheCommandOnceAllAreGone(t *testing.T) {
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	c := exec.Command(self)
	c.Env = append(os.Environ(), "DUET_BARRIER_EXEC=sleep 0.2 & exit 5")
	start := time.Now()
	err = c.Run()
	if code := c.ProcessState.ExitCode(); code != 5 {
		t.Errorf("duet exec exited %d (%v), want the command's 5", code, err)
	}
	if took := time.Since(start); took < 200*time.Millisecond {
		t.Errorf("duet exec returned after %v, before the sleep the command left behind ended", took)
	}
}

// The tests below came from a second review (of 0199120); each failed on
// it.

// execLeftover starts the exec helper (playing `duet exec`) on
// `sh -c 'sleep 30 & echo $! > pid; sleep 30'` in its own process group
// (a job), and returns it and the background sleep's pid.
func execLeftover(t *testing.T) (*exec.Cmd, int, chan error) {
	t.Helper()
	pidFile := filepath.Join(t.TempDir(), "pid")
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	sup := exec.Command(self)
	sup.Env = append(os.Environ(), "DUET_BARRIER_EXEC=sleep 30 & echo $! > "+pidFile+"; sleep 30")
	sup.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := sup.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan error, 1)
	done := make(chan struct{})
	go func() { exited <- sup.Wait(); close(done) }()
	bg := waitPidFile(t, pidFile)
	t.Cleanup(func() {
		sup.Process.Kill() // the leader then kills what is left
		<-done
		unix.Kill(bg, unix.SIGKILL)
	})
	time.Sleep(100 * time.Millisecond) // the foreground sleep runs
	return sup, bg, exited
}

// `kill <duet exec>` (systemd's KillMode=mixed or process, docker stop,
// timeout(1)): the command dies of the forwarded SIGTERM, but the
// background job its shell started is only adopted by the leader, which
// sends it nothing: duet exec stays for as long as that job runs. Before
// 1f81adb it returned at once (143).
func TestExecReturnsAfterSIGTERMEvenWithABackgroundJob(t *testing.T) {
	sup, _, exited := execLeftover(t)
	sup.Process.Signal(syscall.SIGTERM)
	select {
	case err := <-exited:
		t.Logf("duet exec returned: %v", err)
	case <-time.After(5 * time.Second):
		t.Fatal("duet exec still runs 5 s after a SIGTERM that killed its command: it waits for the command's background job, which got no signal")
	}
}

// ^C, twice, at a terminal: the shell and its foreground child die, the
// background job ignores SIGINT (sh makes it so without job control), and
// the second ^C, forwarded to the leftover, is ignored too. duet exec
// cannot be interrupted; before 1f81adb it returned on the first ^C.
func TestExecInterruptibleWithABackgroundJob(t *testing.T) {
	sup, _, exited := execLeftover(t)
	for i := 0; i < 2; i++ {
		unix.Kill(-sup.Process.Pid, unix.SIGINT) // ^C: the job's group
		time.Sleep(300 * time.Millisecond)
	}
	select {
	case err := <-exited:
		t.Logf("duet exec returned: %v", err)
	case <-time.After(5 * time.Second):
		t.Fatal("duet exec still runs 5 s after two ^C: its command died, and the background job that ignores SIGINT holds it")
	}
}

// The leader is a process of its own now (`duet __supervised-child`,
// which `pkill -9 duet`, the OOM killer or a mistaken kill reaches): when
// it dies, duet exec's Wait returns, duet exec exits while the command
// runs on, and the command's durability calls get ENOSYS from then on,
// with nobody left to kill it.
func TestExecLeaderKilledLeavesNoENOSYS(t *testing.T) {
	sup, loop, result := execLoop(t, "none", "", "wait", nil)
	kids := childrenOf(strconv.Itoa(sup.Process.Pid))
	if len(kids) != 1 {
		t.Fatalf("duet exec has children %v, want its leader alone", kids)
	}
	unix.Kill(kids[0], unix.SIGKILL)
	exited := make(chan error, 1)
	go func() { exited <- sup.Wait() }()
	select {
	case err := <-exited:
		t.Logf("duet exec returned (%v) once its leader was killed", err)
	case <-time.After(2 * time.Second):
	}
	time.Sleep(200 * time.Millisecond)
	checkLoopKilledWithoutENOSYS(t, loop, result)
}

// From the final review: a leader that ends without being "killed by a signal" in
// wait(2)'s sense leaves the command to duet exec, which returns without
// adoptAndKill: a user-sent SIGABRT (also SIGILL, SIGTRAP, SIGSYS) makes the
// Go runtime throw and exit(2); a Go fatal error does the same. The command
// then runs on and its durability calls get ENOSYS once duet exec is gone.
func TestExecLeaderAbortedLeavesNoENOSYS(t *testing.T) {
	sup, loop, result := execLoop(t, "none", "", "wait", nil)
	kids := childrenOf(strconv.Itoa(sup.Process.Pid))
	if len(kids) != 1 {
		t.Fatalf("duet exec has children %v, want its leader alone", kids)
	}
	unix.Kill(kids[0], unix.SIGABRT)
	exited := make(chan error, 1)
	go func() { exited <- sup.Wait() }()
	select {
	case err := <-exited:
		t.Logf("duet exec returned (%v) once its leader aborted", err)
	case <-time.After(2 * time.Second):
	}
	time.Sleep(200 * time.Millisecond)
	checkLoopKilledWithoutENOSYS(t, loop, result)
}

// From a review of 1e5ed62 (failed on it): a leader that fails after handing over the listener
// (here: os.StartProcess fails on a script whose interpreter is missing;
// LookPath accepted it) exits 127 without the done byte. Exec then runs
// adoptAndKill in its own process: it SIGKILLs and reaps every child of
// that process, not only what the leader ran. In the test binary (and any
// in-process caller of Exec) that is other code's children.
func TestExecLeaderErrorKillsNothingElse(t *testing.T) {
	dir := t.TempDir()
	script := filepath.Join(dir, "bad-interp")
	if err := os.WriteFile(script, []byte("#!/nonexistent/interp\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	sibling := exec.Command("sleep", "30")
	if err := sibling.Start(); err != nil {
		t.Fatal(err)
	}
	defer sibling.Process.Kill()
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	code, err := Exec(context.Background(), self, []string{script}, func(int32) error { return nil }, nil)
	t.Logf("Exec: code %d, err %v", code, err)
	if !waitGone(sibling.Process.Pid, 300*time.Millisecond) {
		return // still alive: fine
	}
	werr := sibling.Wait()
	t.Errorf("an unrelated child of the calling process (sleep, pid %d) was killed/reaped by Exec after its leader failed (exit %d): its Wait says %v", sibling.Process.Pid, code, werr)
}
