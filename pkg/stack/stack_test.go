package stack

import (
	"bytes"
	"context"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// plain launches args as they are, without an end: a kill is SIGKILL
// to the process group.
func plain(args []string, setup func(*exec.Cmd)) (*exec.Cmd, func(), error) {
	c := exec.Command(args[0], args[1:]...)
	setup(c)
	return c, nil, c.Start()
}

type syncBuf struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuf) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func svc(name, start string) Service {
	return Service{Name: name, Start: start, Interval: 50 * time.Millisecond, StartTimeout: 3 * time.Second, StopTimeout: 2 * time.Second}
}

func TestOrderAndChecks(t *testing.T) {
	dir := t.TempDir()
	order := filepath.Join(dir, "order")
	ready := filepath.Join(dir, "ready")
	mk := func(name string) Service {
		s := svc(name, "trap 'echo stop-"+name+" >>"+order+"; exit 0' TERM; echo start-"+name+" >>"+order+"; touch "+ready+"-"+name+"; while :; do sleep 0.05; done")
		s.CheckCommand = "test -f " + ready + "-" + name
		return s
	}
	st := &Stack{Services: []Service{mk("db"), mk("web")}, Log: slog.New(slog.DiscardHandler), Launch: plain, Output: &syncBuf{}}
	if err := st.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	for _, s := range st.Status() {
		if !s.Running || !s.Healthy {
			t.Errorf("%+v: want running and healthy", s)
		}
	}
	st.Stop()
	b, _ := os.ReadFile(order)
	if got := strings.Fields(string(b)); strings.Join(got, " ") != "start-db start-web stop-web stop-db" {
		t.Errorf("order: %q, want start in order, stop in reverse", got)
	}
}

func TestRestartsThenFails(t *testing.T) {
	dir := t.TempDir()
	starts := filepath.Join(dir, "starts")
	failed := make(chan string, 1)
	// Up well past settle (200 ms), so that each start counts as done
	// and each exit as a failure to restart from: a 0.2 s sleep raced the
	// settle timer, which starts only once the fork returned.
	s := svc("flaky", "echo x >>"+starts+"; sleep 0.6")
	s.Restarts = 2
	st := &Stack{Services: []Service{s}, Log: slog.New(slog.DiscardHandler), Launch: plain, Output: &syncBuf{},
		Failed: func(name, why string) { failed <- name + ": " + why }}
	if err := st.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	defer st.Stop()
	select {
	case why := <-failed:
		t.Logf("failed: %s", why)
	case <-time.After(10 * time.Second):
		t.Fatal("no failure reported")
	}
	b, _ := os.ReadFile(starts)
	if n := strings.Count(string(b), "x"); n != 3 {
		t.Errorf("started %d times, want 1 + 2 restarts", n)
	}
}

func TestStartFailureStopsTheRest(t *testing.T) {
	dir := t.TempDir()
	marker := filepath.Join(dir, "first-stopped")
	first := svc("first", "trap 'touch "+marker+"; exit 0' TERM; while :; do sleep 0.05; done")
	bad := svc("bad", "exit 3")
	st := &Stack{Services: []Service{first, bad}, Log: slog.New(slog.DiscardHandler), Launch: plain, Output: &syncBuf{}}
	err := st.Start(context.Background())
	if err == nil || !strings.Contains(err.Error(), "service bad") {
		t.Fatalf("err = %v, want service bad failing", err)
	}
	if _, err := os.Stat(marker); err != nil {
		t.Error("the service started before the failing one was not stopped")
	}
}

// TestKillReachesARestart: Kill, which the node uses when the durability
// calls the services wait on can no longer be confirmed, leaves no
// service running, even one its watcher was restarting: killed while the
// watcher waited for it to stop, the old process let the restart go on,
// and a new one started after Kill returned (its flushes then failed with
// EIO, what the kill is there to avoid).
func TestKillReachesARestart(t *testing.T) {
	dir := t.TempDir()
	starts := filepath.Join(dir, "starts")
	// The check: a port the test opens and closes (a TCP check, unlike a
	// command, passes under the stopping stack's ended context).
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	// Deaf to SIGTERM: its stop waits StopTimeout, the watcher with it.
	s := svc("nfs", "echo $$ >>"+starts+"; trap '' TERM; exec sleep 1000")
	s.CheckTCP = addr
	s.Restarts, s.StopTimeout = 5, 3*time.Second
	st := &Stack{Services: []Service{s}, Log: slog.New(slog.DiscardHandler), Launch: plain, Output: &syncBuf{}}
	if err := st.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	started := func() []string {
		b, _ := os.ReadFile(starts)
		return strings.Fields(string(b))
	}
	t.Cleanup(func() {
		for _, f := range started() {
			if pid, err := strconv.Atoi(f); err == nil {
				syscall.Kill(-pid, syscall.SIGKILL)
			}
		}
	})
	// The check fails: the watcher stops the service to restart it, and
	// waits for it (SIGTERM is ignored). It passes again for the restart.
	ln.Close()
	for deadline := time.Now().Add(5 * time.Second); st.Status()[0].Error == ""; time.Sleep(10 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("the failing check was not noticed in 5 s")
		}
	}
	if ln, err = net.Listen("tcp", addr); err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	stopped := make(chan struct{})
	go func() {
		st.Stop() // as the node leaving its role does
		close(stopped)
	}()
	st.Kill()
	select {
	case <-stopped:
	case <-time.After(10 * time.Second):
		t.Fatalf("Stop still waits 10 s after Kill (pids started: %s)", started())
	}
	if pids := started(); len(pids) != 1 {
		t.Errorf("service processes started: %s, want the one killed: a restart started after Kill", pids)
	}
}
