package node

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/duet-ha/duet/pkg/stack"
)

// Hook retries: a hook that needs a service coming up with this node (the
// Kubernetes API needs the database) fails at first.
var (
	hookRetry    = 5 * time.Second
	hookGiveUp   = 10 * time.Minute
	hookDeadline = time.Minute // one attempt
)

// hooks runs the configured commands for peer_lost and peer_back.
type hooks struct {
	n       *Node
	mu      sync.Mutex
	lostFor string // the peer peer_lost ran for, until peer_back
	cancel  context.CancelFunc
	done    chan struct{}
	state   string // shown in status
}

// peerLost runs the peer_lost hook for peer, once until it is back.
func (h *hooks) peerLost(peer string) {
	cmd := h.n.cfg.Hooks.PeerLost
	h.mu.Lock()
	defer h.mu.Unlock()
	if cmd == "" || h.lostFor != "" {
		return
	}
	h.lostFor = peer
	h.startLocked("peer_lost", cmd, peer)
}

// peerBack runs the peer_back hook if peer_lost ran. A peer_lost still
// retrying is stopped first (its command killed), without holding the
// lock its goroutine takes to record how it went.
func (h *hooks) peerBack() {
	h.mu.Lock()
	if h.lostFor == "" {
		h.mu.Unlock()
		return
	}
	peer := h.lostFor
	h.lostFor = ""
	cancel, done := h.cancel, h.done
	h.cancel, h.done = nil, nil
	h.mu.Unlock()
	if cancel != nil {
		cancel()
		<-done
	}
	if cmd := h.n.cfg.Hooks.PeerBack; cmd != "" {
		h.mu.Lock()
		h.startLocked("peer_back", cmd, peer)
		h.mu.Unlock()
	}
}

// pending says peer_lost ran and peer_back has not.
func (h *hooks) pending() bool {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.lostFor != ""
}

func (h *hooks) status() string {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.state
}

// setState records how the run that closes done went, unless another
// run has replaced it.
func (h *hooks) setState(done chan struct{}, s string) {
	h.mu.Lock()
	if h.done == done {
		h.state = s
	}
	h.mu.Unlock()
}

func (h *hooks) startLocked(name, cmd, peer string) {
	ctx, cancel := context.WithTimeout(context.Background(), hookGiveUp)
	done := make(chan struct{})
	h.cancel, h.done = cancel, done
	h.state = name + " " + peer + ": running"
	log := h.n.log.With("hook", name, "peer", peer)
	log.Info("running hook", "command", cmd)
	go func() {
		defer close(done)
		defer cancel()
		for try := 1; ; try++ {
			out, err := h.run(ctx, cmd, name, peer)
			if err == nil {
				log.Info("hook succeeded", "tries", try, "output", trimOut(out))
				h.setState(done, fmt.Sprintf("%s %s: done (%d tries)", name, peer, try))
				return
			}
			if ctx.Err() == context.Canceled {
				log.Info("hook stopped: the peer is back", "try", try)
				return
			}
			log.Warn("hook failed: retrying", "try", try, "err", err, "output", trimOut(out))
			h.setState(done, fmt.Sprintf("%s %s: failed %d times, last: %v", name, peer, try, err))
			select {
			case <-ctx.Done():
				if ctx.Err() == context.DeadlineExceeded {
					log.Error("hook gave up", "after", hookGiveUp, "command", cmd)
				}
				return
			case <-time.After(hookRetry):
			}
		}
	}()
}

func (h *hooks) run(ctx context.Context, cmd, name, peer string) ([]byte, error) {
	cctx, cancel := context.WithTimeout(ctx, hookDeadline)
	defer cancel()
	c := stack.Shell(cctx, cmd)
	c.Env = append(os.Environ(), "DUET_HOOK="+name, "DUET_NODE="+h.n.cfg.Node, "DUET_PEER="+peer,
		"DUET_STATE_DIR="+filepath.Clean(h.n.cfg.StateDir))
	return c.CombinedOutput()
}
