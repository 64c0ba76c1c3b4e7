package barrier

import (
	"fmt"
	"os"
	"os/exec"
	"os/signal"
	"strconv"
	"strings"
	"syscall"

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

// runGroup runs path with args as a child (forked on the calling, filtered
// thread, so the command inherits the filter), forwards its exit status,
// and kills the process group when the supervisor dies. Signals sent to the
// group reach the command directly; this process ignores them.
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
	cmd := &exec.Cmd{Path: path, Args: args, Stdin: os.Stdin, Stdout: os.Stdout, Stderr: os.Stderr}
	if err := cmd.Start(); err != nil {
		return err
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	for {
		select {
		case s := <-sigs:
			// A SIGUSR2 from anyone else (an operator reopening logs,
			// the service itself) is not the supervisor's death.
			if s == groupDeathSignal && strconv.Itoa(os.Getppid()) != supervisor {
				unix.Kill(-unix.Getpgrp(), unix.SIGKILL)
				os.Exit(128 + int(unix.SIGKILL))
			}
		case err := <-done:
			code, err := ExitCode(err)
			if err != nil {
				return err
			}
			os.Exit(code)
		}
	}
}
