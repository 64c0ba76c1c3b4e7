package barrier

import (
	"errors"
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// ExecEnv, set to `duet exec`'s pid in its supervised child's environment,
// makes the child stay between `duet exec` and the command
// (runExecLeader) instead of exec'ing it.
//
// With the command exec'd directly, `duet exec` held the only copy of the
// seccomp listener: killed, it took the listener with it, and the kernel
// answered every durability call the command (and whatever it started)
// made from then on, and any it was holding, with ENOSYS, for as long as
// the command ran. ENOSYS says "this call does not exist", which a program
// may take as "nothing to flush" and go on to confirm a write the peer may
// not have.
const ExecEnv = "DUET_EXEC_SUPERVISOR"

// errExecGone is the barrier's answer once `duet exec` is dead: nothing
// can confirm a durability call any more.
var errExecGone = errors.New("duet exec is gone: the call cannot be confirmed durable on the peer")

// runExecLeader runs path with args as a child (forked on the calling,
// filtered thread, so the command inherits the filter) and exits with its
// status, forwarding the signals `duet exec` forwards to it. It keeps its
// copy of the listener (close-on-exec: the command does not get it) and
// adopts what the command leaves behind (a child subreaper), so that when
// `duet exec` dies (the parent-death signal) it can, with nothing lost:
//   - answer every durability call from then on with EIO, never ENOSYS;
//   - kill the command and every process under it, including one that
//     outlived its parent, such as what `sh -c` forked; a call `duet exec`
//     had received and not answered waits, unanswered, until then;
//   - exit once none is left.
func runExecLeader(path string, args []string, parent string, listener int) error {
	sigs := make(chan os.Signal, 8)
	signal.Notify(sigs, groupDeathSignal, syscall.SIGTERM, syscall.SIGINT, syscall.SIGHUP, syscall.SIGQUIT)
	if err := unix.Prctl(unix.PR_SET_PDEATHSIG, uintptr(groupDeathSignal), 0, 0, 0); err != nil {
		return fmt.Errorf("parent-death signal: %w", err)
	}
	if strconv.Itoa(os.Getppid()) != parent {
		return fmt.Errorf("duet exec (pid %s) is gone", parent)
	}
	if err := unix.Prctl(unix.PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0); err != nil {
		return fmt.Errorf("child subreaper: %w", err)
	}
	proc, err := os.StartProcess(path, args, &os.ProcAttr{Env: os.Environ(), Files: []*os.File{os.Stdin, os.Stdout, os.Stderr}})
	if err != nil {
		return err
	}
	// Out of the job's process group, which the command stays in: a
	// terminal's ^C reaches the command once, as when it was exec'd, and
	// what `duet exec` forwards once more through this process.
	unix.Setpgid(0, 0)
	exited := make(chan unix.WaitStatus, 1)
	none := make(chan struct{})
	go reapChildren(proc.Pid, exited, none)
	for {
		select {
		case ws := <-exited:
			os.Exit(waitCode(ws))
		case s := <-sigs:
			if s != groupDeathSignal {
				proc.Signal(s)
				continue
			}
			// A SIGUSR2 from anyone else (an operator, the command) is
			// not duet exec's death.
			if strconv.Itoa(os.Getppid()) == parent {
				continue
			}
			signal.Stop(sigs)
			fmt.Fprintf(os.Stderr, "duet exec (pid %s) died: durability calls now fail with EIO; killing %s and the processes under it\n", parent, args[0])
			go serve(listener, supervisor{wait: func(int32) error { return errExecGone }, install: &sync.Mutex{}})
			killDescendants(none)
			os.Exit(128 + int(unix.SIGKILL))
		}
	}
}

// reapChildren waits for every child of this process (the command, and
// the orphans it leaves, which come here: a subreaper), sends the
// command's status on exited, and closes none when no child is left.
func reapChildren(command int, exited chan<- unix.WaitStatus, none chan<- struct{}) {
	for {
		var ws unix.WaitStatus
		pid, err := unix.Wait4(-1, &ws, 0, nil)
		if errors.Is(err, unix.EINTR) {
			continue
		}
		if err != nil { // ECHILD
			close(none)
			return
		}
		if pid == command {
			exited <- ws
		}
	}
}

// killDescendants SIGKILLs this process's children until it has none. A
// child's own children come here when it dies (this process is their
// subreaper), before the child can be reaped: none closes only once the
// last process under this one is gone.
func killDescendants(none <-chan struct{}) {
	tick := time.NewTicker(10 * time.Millisecond)
	defer tick.Stop()
	for {
		for _, pid := range children() {
			unix.Kill(pid, unix.SIGKILL)
		}
		select {
		case <-none:
			return
		case <-tick.C:
		}
	}
}

// children lists this process's children, from every thread's list.
func children() []int {
	files, _ := filepath.Glob("/proc/self/task/*/children")
	var pids []int
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			continue
		}
		for _, s := range strings.Fields(string(b)) {
			if pid, err := strconv.Atoi(s); err == nil {
				pids = append(pids, pid)
			}
		}
	}
	return pids
}

// waitCode is a shell's exit status for ws: 128+signal when killed.
func waitCode(ws unix.WaitStatus) int {
	if ws.Signaled() {
		return 128 + int(ws.Signal())
	}
	return ws.ExitStatus()
}
