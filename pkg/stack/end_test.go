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
// (its leader stopped or stuck), one grace for all: Kill returns, the
// services gone.
func TestKillUsesEndThenGroup(t *testing.T) {
	var ends atomic.Int32
	launch := func(args []string, setup func(*exec.Cmd)) (*exec.Cmd, func(), error) {
		c := exec.Command(args[0], args[1:]...)
		setup(c)
		return c, func() { ends.Add(1) }, c.Start() // an end that does nothing
	}
	st := &Stack{Services: []Service{svc("db", "exec sleep 1000"), svc("web", "exec sleep 1000")}, Log: slog.New(slog.DiscardHandler), Launch: launch, Output: &syncBuf{}}
	if err := st.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	var pids []int
	for _, s := range st.Status() {
		pids = append(pids, s.Pid)
	}
	start := time.Now()
	st.Kill()
	took := time.Since(start)
	if took < endGrace {
		t.Errorf("Kill returned after %s, before endGrace (%s): the end was not waited for", took, endGrace)
	}
	// One grace for both (from a review: 10 s for two stuck services).
	if took > endGrace+2*time.Second {
		t.Errorf("Kill took %s for two services that did not end: want about one endGrace (%s)", took, endGrace)
	}
	if n := ends.Load(); n != 2 {
		t.Errorf("the ends were called %d times: want once each (the kill; the free once reaped is the same call)", n)
	}
	for _, pid := range pids {
		if syscall.Kill(pid, 0) == nil {
			t.Errorf("service (pid %d) still alive after Kill", pid)
		}
	}
}
