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

// execDoneFD is the leader's end of a pipe to duet exec: one byte written
// just before the leader exits by itself says it did (Exec: otherwise
// what the leader ran is adopted and killed).
const execDoneFD = 4

// errExecGone is the barrier's answer once `duet exec` is dead: nothing
// can confirm a durability call any more.
var errExecGone = errors.New("duet exec is gone: the call cannot be confirmed durable on the peer")

// forwarded are the signals `duet exec` passes on to its command.
var forwarded = []os.Signal{syscall.SIGTERM, syscall.SIGINT, syscall.SIGHUP, syscall.SIGQUIT}

// runExecLeader runs path with args as a child (forked on the calling,
// filtered thread, so the command inherits the filter), forwards the
// signals `duet exec` forwards to it, and exits with its status once it
// and every process it left behind have exited: those run under the
// filter too, and only a holder of the listener keeps their durability
// calls from ENOSYS. A signal `duet exec` forwards (a stop) also reaches,
// once the command has exited, what it left behind, which is killed
// stopGrace later or at the next signal. It keeps its copy of the listener
// (close-on-exec: the command does not get it) and adopts what the command
// leaves behind (a child subreaper). When `duet exec` dies (a pidfd of it
// polled), it
//   - answers every durability call from then on with EIO, never ENOSYS;
//   - kills the command and every process under it, including one that
//     outlived its parent, such as what `sh -c` forked; a call `duet exec`
//     had received and not answered waits, unanswered, until then;
//   - exits once none is left.
func runExecLeader(path string, args []string, parent string, listener int) error {
	// A signal ignored by duet exec's caller (nohup; sh ignores SIGINT
	// for a background job) stays ignored, in the command as when it was
	// exec'd: a handler here would be reset to the default in the
	// command. (SIGQUIT: duet exec's Go runtime catches it, so it reaches
	// this process not ignored.)
	sigs := make(chan os.Signal, 8)
	var caught []os.Signal
	for _, s := range forwarded {
		if !signal.Ignored(s) {
			caught = append(caught, s)
		}
	}
	if len(caught) > 0 {
		signal.Notify(sigs, caught...)
	}
	ppid, err := strconv.Atoi(parent)
	if err != nil {
		return fmt.Errorf("%s=%q: not a pid", ExecEnv, parent)
	}
	pidfd, err := unix.PidfdOpen(ppid, 0)
	if err != nil || os.Getppid() != ppid {
		// Open, it names duet exec: it was still this process's parent
		// after the open.
		return fmt.Errorf("duet exec (pid %d) is gone", ppid)
	}
	if err := unix.Prctl(unix.PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0); err != nil {
		return fmt.Errorf("child subreaper: %w", err)
	}
	// Out of the job's process group, which the command joins: a
	// terminal's ^C reaches the command once, as when it was exec'd, and
	// once more what duet exec forwards through this process.
	job := unix.Getpgrp()
	unix.Setpgid(0, 0)
	proc, err := os.StartProcess(path, args, &os.ProcAttr{Env: os.Environ(),
		Files: []*os.File{os.Stdin, os.Stdout, os.Stderr},
		// Killed with this process: a SIGKILL that reaches duet exec
		// and this process at once (pkill -9 duet) leaves no listener.
		Sys: &syscall.SysProcAttr{Setpgid: true, Pgid: job, Pdeathsig: syscall.SIGKILL}})
	if err != nil {
		return err
	}
	// Its own writes only (the command has exec'd): a broken pipe on
	// stderr must not kill this process before it has killed the rest.
	signal.Notify(make(chan os.Signal, 1), syscall.SIGPIPE)
	parentGone := make(chan struct{})
	go func() {
		defer close(parentGone)
		fds := []unix.PollFd{{Fd: int32(pidfd), Events: unix.POLLIN}}
		for {
			n, err := unix.Poll(fds, -1)
			switch {
			case err == nil && n > 0:
				return // the pidfd is readable: duet exec exited
			case errors.Is(err, unix.EINTR):
			case errors.Is(err, unix.EAGAIN) || errors.Is(err, unix.ENOMEM):
				time.Sleep(10 * time.Millisecond)
			case err != nil:
				// The pidfd cannot be watched: the parent's pid then
				// (reparented once duet exec is gone).
				for os.Getppid() == ppid {
					time.Sleep(100 * time.Millisecond)
				}
				return
			}
		}
	}()
	k := &kin{command: proc.Pid, exited: make(chan unix.WaitStatus, 1), none: make(chan struct{})}
	go k.reap()
	// stop is the last signal duet exec forwarded: once the command has
	// exited, what it left behind gets it too, and is killed stopGrace
	// later or at the next signal (a shell's background job ignores
	// SIGINT: ^C must still end duet exec).
	var stop syscall.Signal
	var grace <-chan time.Time
	code, commandDone := 0, false
	stopLeftovers := func() {
		if stop != 0 && commandDone && grace == nil {
			k.signalChildren(stop)
			grace = time.After(stopGrace)
		}
	}
	for {
		select {
		case ws := <-k.exited:
			code, commandDone = waitCode(ws), true
			stopLeftovers()
		case <-k.none:
			if !commandDone {
				code = waitCode(<-k.exited)
			}
			unix.Write(execDoneFD, []byte{1})
			os.Exit(code)
		case s := <-sigs:
			if grace != nil {
				k.killAll()
				continue // none is closed now
			}
			stop = s.(syscall.Signal)
			if !commandDone {
				proc.Signal(s)
			}
			stopLeftovers()
		case <-grace:
			k.killAll()
		case <-parentGone:
			go serve(listener, supervisor{wait: func(int32) error { return errExecGone }, install: &installs{}})
			// A signal now (a stop of the unit) must not end this
			// process before the others.
			go func() {
				for range sigs {
				}
			}()
			go fmt.Fprintf(os.Stderr, "duet exec (pid %d) died: durability calls now fail with EIO; killing %s and every process under it\n", ppid, args[0])
			k.killAll()
			os.Exit(128 + int(unix.SIGKILL))
		}
	}
}

// stopGrace is how long what the command left behind has to end after the
// signal that stopped duet exec, before it is killed.
const stopGrace = 5 * time.Second

// kin is this process's children: the command, and the orphans it leaves,
// which come here (a subreaper). A child is reaped only under mu, which
// signalChildren holds while it reads the children and signals them: no
// pid it signals can have been reaped and given to another process.
type kin struct {
	command int
	mu      sync.Mutex
	exited  chan unix.WaitStatus // the command's status
	none    chan struct{}        // closed when no child is left
}

// reap reaps every child as it exits.
func (k *kin) reap() {
	for {
		// Wait without reaping, then reap under mu.
		var info unix.Siginfo
		err := unix.Waitid(unix.P_ALL, 0, &info, unix.WEXITED|unix.WNOWAIT, nil)
		if errors.Is(err, unix.EINTR) {
			continue
		}
		if err != nil { // ECHILD
			close(k.none)
			return
		}
		k.mu.Lock()
		for {
			var ws unix.WaitStatus
			pid, err := unix.Wait4(-1, &ws, unix.WNOHANG, nil)
			if err != nil || pid <= 0 {
				break
			}
			if pid == k.command {
				k.exited <- ws
				k.command = 0 // its pid may be another's later
			}
		}
		k.mu.Unlock()
	}
}

// signalChildren sends s to every child.
func (k *kin) signalChildren(s syscall.Signal) {
	k.mu.Lock()
	defer k.mu.Unlock()
	for _, pid := range children() {
		unix.Kill(pid, s)
	}
}

// killAll SIGKILLs the children until none is left. A child's own
// children come here when it dies, before it can be reaped: none closes
// only once the last process under this one is gone.
func (k *kin) killAll() {
	tick := time.NewTicker(10 * time.Millisecond)
	defer tick.Stop()
	for {
		k.signalChildren(unix.SIGKILL)
		select {
		case <-k.none:
			return
		case <-tick.C:
		}
	}
}

// children lists this process's children, from every thread's list, or
// on a kernel without those lists (CONFIG_PROC_CHILDREN) from every
// process's parent.
func children() []int {
	if files, _ := filepath.Glob("/proc/self/task/*/children"); len(files) > 0 {
		return childrenOf("self")
	}
	var pids []int
	self := os.Getpid()
	stats, _ := filepath.Glob("/proc/[0-9]*/stat")
	for _, f := range stats {
		b, err := os.ReadFile(f)
		if err != nil {
			continue
		}
		// pid (comm) state ppid ...: the command's name may hold spaces.
		i := strings.LastIndexByte(string(b), ')')
		if i < 0 {
			continue
		}
		if fs := strings.Fields(string(b[i+1:])); len(fs) > 1 {
			if ppid, _ := strconv.Atoi(fs[1]); ppid == self {
				if pid, err := strconv.Atoi(filepath.Base(filepath.Dir(f))); err == nil {
					pids = append(pids, pid)
				}
			}
		}
	}
	return pids
}

// childrenOf lists the children of process proc (a pid, or "self").
func childrenOf(proc string) []int {
	files, _ := filepath.Glob("/proc/" + proc + "/task/*/children")
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

// adoptAndKill is duet exec's side when its leader did not end by itself
// (a mistaken kill -9, the OOM killer, an abort): the command and what it
// started come
// to duet exec (a child subreaper, Exec), whose listener still answers
// their calls, and are killed; it returns once none is left. A command
// left running would have had ENOSYS from its calls once duet exec
// returned.
func adoptAndKill() {
	k := &kin{exited: make(chan unix.WaitStatus, 1), none: make(chan struct{})}
	go k.reap()
	k.killAll()
}

// waitCode is a shell's exit status for ws: 128+signal when killed.
func waitCode(ws unix.WaitStatus) int {
	if ws.Signaled() {
		return 128 + int(ws.Signal())
	}
	return ws.ExitStatus()
}
