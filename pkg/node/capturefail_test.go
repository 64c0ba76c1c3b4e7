package node

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/duet-ha/duet/pkg/capture"
	"github.com/duet-ha/duet/pkg/stack"
)

// brokenRing fails every read as a corrupt ring would.
type brokenRing struct{}

func (brokenRing) Read(*capture.Record) error {
	return errors.New("capture ring: record header at 4096 is corrupt")
}

// TestCaptureReaderFailureFailsTheTerm: a capture reader that failed on
// something other than its close left the node serving: its services ran
// on, what they wrote was never captured, and every durability call failed
// after drainTimeout. The term now fails as a crashed daemon's: services
// killed, then the daemon exits with status 1 (no clean-stop marker, so the
// restarted node compares its recent changes with the peer's).
func TestCaptureReaderFailureFailsTheTerm(t *testing.T) {
	n := testNode(t, t.TempDir())
	n.stack = &stack.Stack{Services: []stack.Service{
		{Name: "db", Start: "exec sleep 1000", Interval: 50 * time.Millisecond, StartTimeout: 20 * time.Second, StopTimeout: 5 * time.Second},
	}, Log: n.log, Launch: plainLaunch}
	t.Cleanup(n.stack.Kill)
	if err := n.stack.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	exited := make(chan int, 1)
	var runningAtExit bool
	n.exit = func(code int) {
		for _, s := range n.stack.Status() {
			runningAtExit = runningAtExit || s.Running
		}
		exited <- code
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		n.dispatch(brokenRing{}, nil)
	}()
	select {
	case code := <-exited:
		if code != 1 {
			t.Errorf("the daemon exits with status %d, want 1 (a failure: systemd restarts it)", code)
		}
		if runningAtExit {
			t.Errorf("a service still ran when the daemon exited")
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the capture reader failed and the daemon did not exit: the node went on serving without capture")
	}
	<-done
}
