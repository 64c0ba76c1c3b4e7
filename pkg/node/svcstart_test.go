package node

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	"github.com/duet-ha/duet/pkg/stack"
)

// From a review of the services' background start (efbaaa7); failed on it.
//
// TestEndServiceStartLaunchesNothingMore: once endServiceStart returned
// (the node leaves the role), no service of the start may have been
// launched after it was asked to end, and none may run.
func TestEndServiceStartLaunchesNothingMore(t *testing.T) {
	n := testNode(t, t.TempDir())
	dir := t.TempDir()
	second := filepath.Join(dir, "web-started")
	// Neither has a check: each counts as started once it lived 200 ms.
	n.stack = &stack.Stack{Services: []stack.Service{
		{Name: "db", Start: "exec sleep 1000", Interval: 50 * time.Millisecond, StartTimeout: 20 * time.Second, StopTimeout: 5 * time.Second},
		{Name: "web", Start: "touch " + second + "; exec sleep 1000", Interval: 50 * time.Millisecond, StartTimeout: 20 * time.Second, StopTimeout: 5 * time.Second},
	}, Log: n.log, Launch: plainLaunch}
	t.Cleanup(n.stack.Kill)
	n.startServices(context.Background())
	time.Sleep(50 * time.Millisecond) // db is being launched
	n.endServiceStart()
	if _, err := os.Stat(second); err == nil {
		t.Errorf("service web was launched after the start was ended")
	}
	for _, s := range n.stack.Status() {
		if s.Running {
			t.Errorf("service %s runs after endServiceStart returned: %+v", s.Name, s)
		}
	}
}

// plainLaunch starts a service's command unsupervised, without an end.
func plainLaunch(args []string, setup func(*exec.Cmd)) (*exec.Cmd, func(), error) {
	c := exec.Command(args[0], args[1:]...)
	setup(c)
	return c, nil, c.Start()
}
