package stack

import (
	"context"
	"log/slog"
	"os/exec"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
)

// TestKillUsesEndThenGroup: Kill asks each service's end first, and
// SIGKILLs the process group of one that is still there after endGrace
// (its leader stopped or stuck): Kill returns, the service gone.
func TestKillUsesEndThenGroup(t *testing.T) {
	var ends atomic.Int32
	launch := func(args []string, setup func(*exec.Cmd)) (*exec.Cmd, func(), error) {
		c := exec.Command(args[0], args[1:]...)
		setup(c)
		return c, func() { ends.Add(1) }, c.Start() // an end that does nothing
	}
	st := &Stack{Services: []Service{svc("db", "exec sleep 1000")}, Log: slog.New(slog.DiscardHandler), Launch: launch, Output: &syncBuf{}}
	if err := st.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	pid := st.Status()[0].Pid
	start := time.Now()
	st.Kill()
	if took := time.Since(start); took < endGrace {
		t.Errorf("Kill returned after %s, before endGrace (%s): the end was not waited for", took, endGrace)
	}
	if n := ends.Load(); n != 1 {
		t.Errorf("the end was called %d times: want once (the kill; the free once reaped is the same call)", n)
	}
	if syscall.Kill(pid, 0) == nil {
		t.Errorf("service (pid %d) still alive after Kill", pid)
	}
}
