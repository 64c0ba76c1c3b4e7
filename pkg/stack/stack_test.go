package stack

import (
	"bytes"
	"context"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"
)

func plain(args []string, setup func(*exec.Cmd)) (*exec.Cmd, error) {
	c := exec.Command(args[0], args[1:]...)
	setup(c)
	return c, c.Start()
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
