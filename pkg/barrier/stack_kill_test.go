package barrier

import (
	"context"
	"errors"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	"github.com/duet-ha/duet/pkg/stack"
	"golang.org/x/sys/unix"
)

// serviceStack is one service, script, run as the daemon runs its
// services: under the barrier, in a group led by runGroup. Every
// durability call is held until the test ends (a barrier that cannot
// confirm: the node kills the services instead of failing the call).
func serviceStack(t *testing.T, script string, stopTimeout time.Duration) *stack.Stack {
	t.Helper()
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	held := make(chan struct{})
	t.Cleanup(func() { close(held) })
	wait := func(int32) error { <-held; return errors.New("test over") }
	st := &stack.Stack{
		Services: []stack.Service{{Name: "db", Start: script, StartTimeout: 10 * time.Second, StopTimeout: stopTimeout, Interval: time.Second}},
		Log:      slog.New(slog.DiscardHandler), Output: os.Stderr,
		Launch: func(args []string, setup func(*exec.Cmd)) (*exec.Cmd, func(), error) {
			return StartGroup(self, args, wait, nil, setup)
		},
	}
	if err := st.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(st.Kill)
	return st
}

// TestStackKillReachesSetsidDescendant: Stack.Kill, the node's answer to
// durability calls it can no longer confirm, sent SIGKILL to the
// service's process group. Its leader died first, and a process that had
// left the group (setsid: a database's backends, a daemonizing helper)
// ran on unsupervised; its held fdatasync then returned. Every process
// under the service must be gone, its call never answered.
func TestStackKillReachesSetsidDescendant(t *testing.T) {
	dir := t.TempDir()
	file, result, pidFile := filepath.Join(dir, "data"), filepath.Join(dir, "result"), filepath.Join(dir, "pid")
	self, _ := os.Executable()
	st := serviceStack(t, "DUET_BARRIER_HELPER=fdatasync-loop DUET_BARRIER_FILE="+file+
		" DUET_BARRIER_RESULT="+result+" DUET_BARRIER_PIDFILE="+pidFile+
		" setsid '"+self+"' & exec sleep 1000", 5*time.Second)
	pid := waitPidFile(t, pidFile)
	defer unix.Kill(pid, unix.SIGKILL)
	waitCalling(t, result)
	st.Kill()
	if !waitGone(pid, 3*time.Second) {
		t.Errorf("a setsid'd process of the service (pid %d) outlived Stack.Kill", pid)
	}
	if b, _ := os.ReadFile(result); string(b) != "calling\n" {
		t.Errorf("its durability call returned: %q", b)
	}
}

// TestStackStopKillsSetsidDescendantAtTimeout: a stop SIGTERMs the group
// and, after StopTimeout, SIGKILLs it. A setsid'd process that ignores
// SIGTERM kept the leader waiting (it waits for every descendant); the
// group's SIGKILL then killed the leader and left that process running,
// unsupervised and writing after the node had stopped capturing.
func TestStackStopKillsSetsidDescendantAtTimeout(t *testing.T) {
	pidFile := filepath.Join(t.TempDir(), "pid")
	st := serviceStack(t, "setsid sh -c 'trap \"\" TERM; echo $$ >"+pidFile+"; exec sleep 1000' & exec sleep 1000", time.Second)
	pid := waitPidFile(t, pidFile)
	defer unix.Kill(pid, unix.SIGKILL)
	st.Stop()
	if !waitGone(pid, 3*time.Second) {
		t.Errorf("a setsid'd process of the service that ignores SIGTERM (pid %d) outlived the stop", pid)
	}
}
