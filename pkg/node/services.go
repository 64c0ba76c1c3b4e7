package node

import (
	"context"
	"errors"
	"log/slog"
	"os"
	"os/exec"

	"github.com/duet-ha/duet/pkg/barrier"
	"github.com/duet-ha/duet/pkg/cluster"
	"github.com/duet-ha/duet/pkg/config"
	"github.com/duet-ha/duet/pkg/stack"
)

// newStack makes the configured services: each runs under the barrier's
// supervision, so its fsyncs wait until the data is on the peer.
func newStack(cfg *config.Config, log *slog.Logger, self string, n *Node) *stack.Stack {
	st := &stack.Stack{Log: log, Output: os.Stderr}
	for _, s := range cfg.Services {
		st.Services = append(st.Services, stack.Service{Name: s.Name, Start: s.Start, Stop: s.Stop,
			CheckTCP: s.CheckTCP, CheckCommand: s.CheckCommand, CheckNFS: s.CheckNFS, Interval: s.CheckInterval,
			StartTimeout: s.StartTimeout, StopTimeout: s.StopTimeout, Restarts: *s.Restarts})
	}
	wait := func(int32) error {
		if r := n.barrier(context.Background()); r != "ok" && r != "alone" {
			return errors.New(r)
		}
		return nil
	}
	// Each service's process group dies with the daemon, and a kill
	// reaches every process under it (barrier.StartGroup): a service left
	// running by a crashed daemon would hold its port (the next start
	// fails) and serve without duet.
	st.Launch = func(args []string, setup func(*exec.Cmd)) (*exec.Cmd, func(), error) {
		return barrier.StartGroup(self, args, wait, n.observeCall, setup)
	}
	st.Failed = func(service, why string) {
		n.events <- cluster.Event{Kind: cluster.EvServiceDown, Why: service + ": " + why}
	}
	return st
}
