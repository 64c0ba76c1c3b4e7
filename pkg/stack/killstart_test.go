package stack

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// From a review of the services' background start (efbaaa7); failed on it.
//
// TestKillReachesAServiceBeingStarted: Kill ends every service "and
// returns when they are gone"; the node's watchLeaving relies on it
// before it fails the durability calls still held. A service Start is
// still launching (its check not passed yet) must be killed too.
func TestKillReachesAServiceBeingStarted(t *testing.T) {
	dir := t.TempDir()
	pidFile := filepath.Join(dir, "pid")
	s := svc("db", "echo $$ > "+pidFile+"; exec sleep 1000")
	s.CheckCommand = "false"
	s.StartTimeout = 30 * time.Second
	st := &Stack{Services: []Service{s}, Log: slog.New(slog.DiscardHandler), Launch: plain, Output: &syncBuf{}}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- st.Start(ctx) }()
	t.Cleanup(func() { cancel(); <-done })
	var pid int
	for deadline := time.Now().Add(5 * time.Second); pid == 0; time.Sleep(10 * time.Millisecond) {
		b, _ := os.ReadFile(pidFile)
		pid, _ = strconv.Atoi(strings.TrimSpace(string(b)))
		if pid == 0 && time.Now().After(deadline) {
			t.Fatal("the service did not start in 5 s")
		}
	}
	st.Kill()
	alive := func() bool {
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
		return err == nil && !strings.Contains(string(b), ") Z ")
	}
	if alive() {
		t.Errorf("Kill returned and the service being started (pid %d) still runs", pid)
	}
	time.Sleep(time.Second)
	if alive() {
		t.Errorf("the service being started (pid %d) still runs 1 s after Kill", pid)
		syscall.Kill(-pid, syscall.SIGKILL)
	}
}
