package barrier

import (
	"fmt"
	"os"
	"os/exec"
	"os/signal"
	"strconv"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// GroupEnv, set to the supervisor's pid in a supervised child's
// environment, makes the child stay as the leader of the command's process
// group instead of exec'ing it: when the supervisor dies, the kernel sends
// the child its parent-death signal and the child kills the whole group.
//
// The parent-death signal alone reaches only the direct child, which for a
// service is /bin/sh: dash forks the command instead of exec'ing it, so a
// service survived a SIGKILL of the daemon (the nemesis found a restarted
// daemon unable to bind its service's port, the old instance still
// serving without anyone to stop it).
const GroupEnv = "DUET_SERVICE_GROUP"

// groupDeathSignal is the child's parent-death signal: one a service does
// not get from duet otherwise, so the child can tell it apart.
const groupDeathSignal = unix.SIGUSR2

// isGroupEnv says whether kv (an environment entry) is GroupEnv's.
func isGroupEnv(kv string) bool { return strings.HasPrefix(kv, GroupEnv+"=") }

// groupEndEnv, in a group leader's environment, is the descriptor of the
// read end of its end pipe (StartGroup): when the supervisor closes the
// write end, the leader kills every process under it and exits.
const groupEndEnv = "DUET_SERVICE_END_FD"

// StartGroup starts args supervised as a service of the daemon: in its
// own process group (setup must set Setpgid), led by runGroup, which kills
// every process under it when the daemon dies. It returns the running
// command and its end: a call that makes the leader kill every process
// under it, also one that left the group (setsid), and exit 128+SIGKILL.
// After the command is reaped the end only frees the pipe; call it once
// (the caller makes it once).
//
// A SIGKILL to the group reached the leader first: what had left the
// group ran on unsupervised, and its held durability call returned
// (TestStackKillReachesSetsidDescendant). The leader cannot catch a
// SIGKILL, nor tell the supervisor's signal from a service's own; it
// reads the pipe.
func StartGroup(self string, args []string, wait Func, observe Observer, setup func(*exec.Cmd)) (*exec.Cmd, func(), error) {
	r, w, err := os.Pipe() // close-on-exec: no other child keeps a copy
	if err != nil {
		return nil, nil, err
	}
	cmd, err := Start(self, args, wait, observe, func(c *exec.Cmd) {
		if setup != nil {
			setup(c)
		}
		if c.Env == nil {
			c.Env = os.Environ()
		}
		// Start puts its socket at descriptor 3, before setup's files.
		fd := 3 + 1 + len(c.ExtraFiles)
		c.ExtraFiles = append(c.ExtraFiles, r)
		c.Env = append(c.Env, GroupEnv+"="+strconv.Itoa(os.Getpid()), groupEndEnv+"="+strconv.Itoa(fd))
	})
	r.Close()
	if err != nil {
		w.Close()
		return nil, nil, err
	}
	return cmd, func() { w.Close() }, nil
}

// endRequests returns a channel closed when the write end of the pipe
// whose read end is fd closes (or is written to): the supervisor's
// request to end the group, or its death. fd < 0: never.
func endRequests(fd int) <-chan struct{} {
	c := make(chan struct{})
	if fd < 0 {
		return c
	}
	f := os.NewFile(uintptr(fd), "end")
	go func() {
		f.Read(make([]byte, 1)) // blocks until then
		close(c)
	}()
	return c
}

// groupLinger bounds how long the rest of a group may outlive a command
// that ended by itself: SIGTERM, then this long, then SIGKILL.
const groupLinger = 10 * time.Second

// runGroup runs path with args as a child (forked on the calling, filtered
// thread, so the command inherits the filter), forwards its exit status,
// and kills the process group when the supervisor dies. Signals sent to the
// group reach the command directly; this process ignores them.
//
// It exits only once every process the command started is gone (it is
// their subreaper): the daemon takes this process's exit for the
// service's, and the command is often a shell that does not exec its
// server (dash forks even a single command), which dies at once on the
// group's SIGTERM while the server shuts down. This process followed the
// shell, and the service counted as stopped while the server still wrote:
// the node then removed the VIP and stopped capturing, and the server's
// last writes were made unreplicated, after the peer may have begun
// serving (TestGroupLeaderOutlivesItsGroup, from a review). A command
// that ends by itself takes the rest of its group with it: SIGTERM, then
// SIGKILL after groupLinger.
//
// endFD, if not negative, is the read end of the end pipe (StartGroup):
// it is read from before the command starts, and the command does not
// get it.
func runGroup(path string, args []string, supervisor string, endFD int) error {
	sigs := make(chan os.Signal, 8)
	signal.Notify(sigs, groupDeathSignal, syscall.SIGTERM, syscall.SIGINT, syscall.SIGHUP, syscall.SIGQUIT)
	if err := unix.Prctl(unix.PR_SET_PDEATHSIG, uintptr(groupDeathSignal), 0, 0, 0); err != nil {
		return fmt.Errorf("parent-death signal: %w", err)
	}
	// The supervisor may have died before the prctl: then the parent is
	// already another process.
	if strconv.Itoa(os.Getppid()) != supervisor {
		return fmt.Errorf("the supervisor (pid %s) is gone", supervisor)
	}
	if err := unix.Prctl(unix.PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0); err != nil {
		return fmt.Errorf("child subreaper: %w", err)
	}
	if endFD >= 0 {
		unix.CloseOnExec(endFD)
	}
	ends := endRequests(endFD)
	proc, err := os.StartProcess(path, args, &os.ProcAttr{Env: os.Environ(), Files: []*os.File{os.Stdin, os.Stdout, os.Stderr}})
	if err != nil {
		return err
	}
	// One reaper for every child, from the start: the command, and each
	// orphan adopted while it runs (a zombie until the service ended
	// otherwise: TestGroupLeaderReapsOrphansWhileCommandRuns, from a
	// review). os.Process.Wait is never called: it would race it for the
	// command's status.
	k := &kin{command: proc.Pid, exited: make(chan unix.WaitStatus, 1), none: make(chan struct{})}
	go k.reap()
	var (
		code     int
		ended    bool                  // the command's exit was seen
		stopped  bool                  // the group was told to stop (SIGTERM...)
		linger   <-chan time.Time      // ended by itself: SIGKILL for the rest
		onSignal = func(s os.Signal) { // a signal to this process
			// A SIGUSR2 from anyone else (an operator reopening logs,
			// the service itself) is not the supervisor's death.
			if s == groupDeathSignal && strconv.Itoa(os.Getppid()) != supervisor {
				// Every descendant, also one that left the group
				// (setsid: a database's backends, a daemonizing
				// helper), which a SIGKILL of the group missed: this
				// process died with it, the last copy of the listener
				// closed, and the survivor's durability calls got
				// ENOSYS (TestSetsidDescendantDiesWithSupervisor, from
				// a review). This process stays until none is left.
				k.killAll()
				os.Exit(128 + int(unix.SIGKILL))
			}
			if s != groupDeathSignal {
				stopped = true
			}
		}
	)
	for {
		select {
		case s := <-sigs:
			onSignal(s)
		case ws := <-k.exited:
			ended, code = true, waitCode(ws)
			if ws.Signaled() && stopSignal(ws.Signal()) {
				stopped = true // killed by the group's stop
			}
			if !stopped {
				// The group's SIGTERM reached this process too, but
				// may still be in the runtime's queue: a stop taken
				// for an exit of the command's own SIGKILLed the
				// server at groupLinger (TestStoppedGroupNotKilledAtLinger).
				select {
				case s := <-sigs:
					onSignal(s)
				case <-time.After(100 * time.Millisecond):
				}
			}
			if !stopped {
				// Ended by itself: what it left running goes too (this
				// process ignores the signal).
				unix.Kill(-unix.Getpgrp(), unix.SIGTERM)
				linger = time.After(groupLinger)
			}
		case <-ends:
			// The supervisor's kill (Stack.Kill, a stop past its
			// timeout), or its death: every descendant, as above.
			k.killAll()
			os.Exit(128 + int(unix.SIGKILL))
		case <-linger:
			// Everything under this process, also what left the group
			// (setsid): every descendant is a child by now or once its
			// parent dies.
			k.killAll()
			os.Exit(code)
		case <-k.none:
			if !ended {
				code = waitCode(<-k.exited) // sent before the reaper ended
			}
			os.Exit(code)
		}
	}
}

// stopSignal says whether sig is one a stop sends the group.
func stopSignal(sig unix.Signal) bool {
	return sig == unix.SIGTERM || sig == unix.SIGINT || sig == unix.SIGHUP || sig == unix.SIGQUIT
}
