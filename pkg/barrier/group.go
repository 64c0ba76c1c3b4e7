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
func runGroup(path string, args []string, supervisor string) error {
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
	cmd := &exec.Cmd{Path: path, Args: args, Stdin: os.Stdin, Stdout: os.Stdout, Stderr: os.Stderr}
	if err := cmd.Start(); err != nil {
		return err
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	var (
		code    int
		stopped bool          // the group was told to stop (SIGTERM...)
		reaped  chan struct{} // closed when no descendant is left
		linger  <-chan time.Time
		giveUp  <-chan time.Time
	)
	for {
		select {
		case s := <-sigs:
			// A SIGUSR2 from anyone else (an operator reopening logs,
			// the service itself) is not the supervisor's death.
			if s == groupDeathSignal && strconv.Itoa(os.Getppid()) != supervisor {
				unix.Kill(-unix.Getpgrp(), unix.SIGKILL)
				os.Exit(128 + int(unix.SIGKILL))
			}
			if s != groupDeathSignal {
				stopped = true
			}
		case err := <-done:
			var werr error
			if code, werr = ExitCode(err); werr != nil {
				return werr
			}
			if !stopped {
				// Ended by itself: what it left running goes too.
				killGroupButSelf(unix.SIGTERM)
				linger = time.After(groupLinger)
			}
			reaped = make(chan struct{})
			go reapAll(reaped)
		case <-linger:
			killGroupButSelf(unix.SIGKILL)
			linger = nil
			// A descendant that left the group (setsid) is not reached:
			// not waited for long.
			giveUp = time.After(2 * time.Second)
		case <-giveUp:
			os.Exit(code)
		case <-reaped:
			os.Exit(code)
		}
	}
}

// reapAll waits for every child of this process (a subreaper: every
// descendant whose parent died becomes one) until none is left, then
// closes reaped.
func reapAll(reaped chan<- struct{}) {
	for {
		var ws unix.WaitStatus
		_, err := unix.Wait4(-1, &ws, 0, nil)
		if err == unix.ECHILD {
			close(reaped)
			return
		}
		if err != nil && err != unix.EINTR {
			close(reaped) // cannot wait: nothing to wait for
			return
		}
	}
}

// killGroupButSelf sends sig to every other process of this process's
// group (a signal to the group would end this process too, and its exit
// status is the command's).
func killGroupButSelf(sig unix.Signal) {
	self, pgrp := os.Getpid(), unix.Getpgrp()
	entries, err := os.ReadDir("/proc")
	if err != nil {
		return
	}
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || pid == self {
			continue
		}
		if g, err := unix.Getpgid(pid); err == nil && g == pgrp {
			unix.Kill(pid, sig)
		}
	}
}
