package stack

import (
	"context"
	"os/exec"
	"syscall"
	"time"
)

// Shell runs an operator's command line (a check, a stop command, a hook,
// a fencing command) with /bin/sh. The shell and whatever it starts are
// one process group, killed whole when ctx ends, so that a deadline holds
// even when a child keeps the output pipe open.
func Shell(ctx context.Context, cmd string) *exec.Cmd {
	c := exec.CommandContext(ctx, "/bin/sh", "-c", cmd)
	c.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	c.Cancel = func() error { return syscall.Kill(-c.Process.Pid, syscall.SIGKILL) }
	c.WaitDelay = 5 * time.Second
	return c
}
