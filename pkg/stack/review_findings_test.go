package stack

// From a review of the configuration, the CLI and the service stack (forty-second session): each test failed on 589ea28.

import (
	"context"
	"log/slog"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"
)

// With a non-positive Interval (config accepts check_interval: -1s),
// Start succeeds and the watcher's time.NewTicker panics: the whole daemon
// dies. Run in a child process so that the panic is observed, not fatal
// to this test binary.
func TestNonPositiveIntervalCrashes(t *testing.T) {
	if os.Getenv("DUET_REVIEW_CHILD") == "1" {
		s := svc("web", "sleep 30")
		s.Interval = -time.Second
		st := &Stack{Services: []Service{s}, Log: slog.New(slog.DiscardHandler), Launch: plain, Output: &syncBuf{}}
		if err := st.Start(context.Background()); err != nil {
			os.Stdout.WriteString("START-REFUSED: " + err.Error() + "\n")
			return
		}
		time.Sleep(500 * time.Millisecond)
		st.Stop()
		return
	}
	cmd := exec.Command(os.Args[0], "-test.run=^TestNonPositiveIntervalCrashes$", "-test.count=1")
	cmd.Env = append(os.Environ(), "DUET_REVIEW_CHILD=1")
	out, err := cmd.CombinedOutput()
	if err != nil {
		first := strings.SplitN(string(out), "\n", 3)
		t.Fatalf("a service with check interval -1s crashed the process: %v\n%s", err, strings.Join(first[:min(2, len(first))], "\n"))
	}
}

// A start command that daemonizes (systemctl start, mysqld_safe &, a
// server that forks) exits 0 at once; the error says only "exited during
// start: exit status 0", not that start must stay in the foreground.
func TestDaemonizingStartExplained(t *testing.T) {
	s := svc("db", "true")
	st := &Stack{Services: []Service{s}, Log: slog.New(slog.DiscardHandler), Launch: plain, Output: &syncBuf{}}
	err := st.Start(context.Background())
	if err == nil {
		t.Fatal("a start command that exits at once was taken as started")
	}
	if !strings.Contains(err.Error(), "foreground") {
		t.Fatalf("error %q: does not tell the operator that start must run in the foreground", err)
	}
}

// A service that fails its start leaves nothing in Status: Start's Stop
// drops every service, so `duet status` shows no service and no error;
// only the log says which one failed and why.
func TestFailedStartInvisibleInStatus(t *testing.T) {
	ok := svc("web", "sleep 30")
	bad := svc("db", "echo 'cannot open datadir' >&2; exit 1")
	st := &Stack{Services: []Service{ok, bad}, Log: slog.New(slog.DiscardHandler), Launch: plain, Output: &syncBuf{}}
	if err := st.Start(context.Background()); err == nil {
		t.Fatal("want a start failure")
	}
	for _, s := range st.Status() {
		if s.Name == "db" && s.Error != "" {
			return
		}
	}
	t.Fatalf("status after the failed start: %+v: names neither the failed service nor its error", st.Status())
}

// Restarts were counted over the whole time the node served, never reset
// after the service had been healthy again: with restarts: 1, two crashes
// far apart (here 2.5 s of health, restartForgiven checks being 1 s; in
// the field weeks) failed the node over. TestRestartsThenFails keeps
// crashes 0.6 s apart failing it over.
func TestRestartBudgetNeverResets(t *testing.T) {
	s := svc("web", "sleep 2.5; exit 1")
	s.Restarts = 1
	failed := make(chan string, 1)
	st := &Stack{Services: []Service{s}, Log: slog.New(slog.DiscardHandler), Launch: plain, Output: &syncBuf{},
		Failed: func(service, why string) { failed <- service }}
	if err := st.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	defer st.Stop()
	select {
	case <-failed:
		t.Fatalf("failed over after crashes 2.5 s apart, each after a healthy run: restarts %+v", st.Status())
	case <-time.After(6 * time.Second):
	}
}
