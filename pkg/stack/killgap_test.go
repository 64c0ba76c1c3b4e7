package stack

import (
	"context"
	"log/slog"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
)

// hookCtx runs hook inside the n-th call of Err (Start calls Err before
// and after each launch): it places another goroutine's call exactly there.
type hookCtx struct {
	context.Context
	calls atomic.Int32
	n     int32
	hook  func()
}

func (c *hookCtx) Err() error {
	if c.calls.Add(1) == c.n {
		c.hook()
	}
	return c.Context.Err()
}

// From a review of cd94055 (failed on it): a service left s.launching
// (launch's defer) before Start put it in s.running. A Kill in between (watchLeaving's, from
// another goroutine) sees it in neither list and returns while it runs;
// Start then keeps it and returns nil. Kill's contract: "returns when they
// are gone", and after it nothing may come back until the next Start.
func TestKillBetweenLaunchAndRunning(t *testing.T) {
	st := &Stack{Services: []Service{svc("db", "exec sleep 1000")}, Log: slog.New(slog.DiscardHandler), Launch: plain, Output: &syncBuf{}}
	var killedAt time.Time
	ctx := &hookCtx{Context: context.Background(), n: 2, hook: func() { st.Kill(); killedAt = time.Now() }}
	err := st.Start(ctx)
	t.Cleanup(func() {
		for _, s := range st.Status() {
			if s.Pid > 0 {
				syscall.Kill(-s.Pid, syscall.SIGKILL)
			}
		}
		st.Stop()
	})
	if killedAt.IsZero() {
		t.Fatal("the hook did not run")
	}
	time.Sleep(300 * time.Millisecond)
	for _, s := range st.Status() {
		if s.Running {
			t.Errorf("Start returned %v; service %s (pid %d) runs %v after a Kill that returned: %+v", err, s.Name, s.Pid, time.Since(killedAt).Round(time.Millisecond), s)
		}
	}
}
