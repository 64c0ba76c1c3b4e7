package node

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/duet-ha/duet/pkg/config"
	"github.com/duet-ha/duet/pkg/stack"
)

// Hook retries: a hook that needs a service coming up with this node (the
// Kubernetes API needs the database) fails at first.
var (
	hookRetry    = 5 * time.Second
	hookGiveUp   = 10 * time.Minute
	hookDeadline = time.Minute // one attempt
)

// hooks runs the configured commands for peer_lost and peer_back, as the
// loss (loss.go) decides, one command at a time. The cluster loop tells it
// of losses (lost) and of what it sees at every tick (tick); only that
// goroutine calls them.
type hooks struct {
	cfg      config.Hooks
	node     string
	stateDir string
	log      *slog.Logger

	mu    sync.Mutex
	loss  loss
	run   *hookRun // the command running, or nil
	state string   // the last command and how it went, shown in status
}

// hookRun is one command running, retried until it succeeds (the check:
// tried once).
type hookRun struct {
	kind   hookKind
	cancel context.CancelFunc
	done   chan struct{}
}

func hooksPath(stateDir string) string { return filepath.Join(stateDir, "hooks.json") }

// newHooks takes up the hooks' state a previous daemon saved in stateDir.
func newHooks(cfg *config.Config, log *slog.Logger) (*hooks, error) {
	h := &hooks{cfg: cfg.Hooks, node: cfg.Node, stateDir: cfg.StateDir, log: log}
	path := hooksPath(cfg.StateDir)
	b, err := os.ReadFile(path)
	if errors.Is(err, os.ErrNotExist) {
		return h, nil
	}
	if err == nil {
		err = json.Unmarshal(b, &h.loss)
	}
	if err != nil {
		return nil, fmt.Errorf("hook state %s: %w (move it away to start afresh; remove by hand what a peer_lost it records did, e.g. the out-of-service taint)", path, err)
	}
	h.loss = h.loss.restarted()
	if d := h.loss.describe(time.Now(), h.policy()); d != "" {
		h.log.Info("hook state taken up", "state", d)
	}
	return h, nil
}

func (h *hooks) policy() lossPolicy {
	return lossPolicy{after: h.cfg.PeerLostAfter, check: h.cfg.PeerLostCheck != "", retry: hookRetry}
}

// lost tells the hooks that this serving node lost peer, silent since
// since; fenced says the fencing command succeeded for this loss.
func (h *hooks) lost(peer string, since time.Time, fenced bool) {
	if h.cfg.PeerLost == "" {
		return
	}
	h.mu.Lock()
	l, act := h.loss.lost(peer, since, fenced, h.runningLocked())
	h.apply(l, act)
}

// owed says a peer_back is owed.
func (h *hooks) owed() bool {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.loss.Owed
}

// tick lets the loss go on with what the cluster loop sees.
func (h *hooks) tick(v peerView) {
	h.mu.Lock()
	l, act := h.loss.step(v, h.runningLocked(), h.policy())
	h.apply(l, act)
}

// apply takes the step's loss and carries out its act; it is called with
// h.mu held and releases it. The command stopped is waited for without
// the lock, which its goroutine takes to record how it went.
func (h *hooks) apply(l loss, act hookAct) {
	changed := savedPart(l) != savedPart(h.loss)
	h.loss = l
	if changed {
		h.saveLocked()
	}
	log := h.log.With("peer", l.Peer)
	if act.say != "" {
		if d := l.describe(time.Now(), h.policy()); d != "" {
			log.Info(act.say, "hook_state", d)
		} else {
			log.Info(act.say)
		}
	}
	var stopped *hookRun
	if act.stop && h.run != nil {
		stopped, h.run = h.run, nil
	}
	h.mu.Unlock()
	if stopped != nil {
		log.Info("stopping a hook: no longer needed", "hook", stopped.kind.String())
		stopped.cancel()
		<-stopped.done
	}
	if act.start != hookNone {
		h.mu.Lock()
		h.startLocked(act.start, l.Peer)
		h.mu.Unlock()
	}
}

func (h *hooks) runningLocked() hookKind {
	if h.run == nil {
		return hookNone
	}
	return h.run.kind
}

// savedPart is what hooks.json holds of l.
func savedPart(l loss) loss {
	return loss{Peer: l.Peer, Suspect: l.Suspect, Since: l.Since, Owed: l.Owed, Done: l.Done}
}

// saveLocked writes hooks.json as cluster.json is written (a temporary
// file, fsynced, renamed, the directory fsynced): a peer_back owed must
// survive a crash of this node.
func (h *hooks) saveLocked() {
	b, _ := json.Marshal(savedPart(h.loss))
	if err := writeDurable(hooksPath(h.stateDir), b); err != nil {
		h.log.Error("hook state not saved: a restart now would forget it", "err", err)
	}
}

// status says how the last command went and where the loss stands.
func (h *hooks) status() (last, loss string) {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.state, h.loss.describe(time.Now(), h.policy())
}

// report shows how the run r goes, unless another run replaced it.
func (h *hooks) report(r *hookRun, state string) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.run == r {
		h.state = state
	}
}

// end records how the run r ended, unless another run replaced it, and
// says whether the status line changed.
func (h *hooks) end(r *hookRun, ok bool, state string) bool {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.endLocked(r, ok, state)
}

func (h *hooks) endLocked(r *hookRun, ok bool, state string) bool {
	if h.run != r {
		return false
	}
	h.run = nil
	changed := state != "" && state != h.state
	if changed {
		h.state = state
	}
	if !ok {
		return changed
	}
	prev := h.loss
	switch r.kind {
	case hookCheck:
		h.loss.confirmed = true
	case hookLost:
		h.loss.Done = true
	case hookBack:
		h.loss.Owed, h.loss.Done = false, false
	}
	if savedPart(prev) != savedPart(h.loss) {
		h.saveLocked()
	}
	return changed
}

func (h *hooks) command(k hookKind) string {
	switch k {
	case hookCheck:
		return h.cfg.PeerLostCheck
	case hookLost:
		return h.cfg.PeerLost
	case hookBack:
		return h.cfg.PeerBack
	}
	return ""
}

// startLocked runs the command of kind k for peer: the check once (the
// loss tries it again later), the hooks until they succeed or give up.
func (h *hooks) startLocked(k hookKind, peer string) {
	name, cmd := k.String(), h.command(k)
	ctx, cancel := context.WithTimeout(context.Background(), hookGiveUp)
	r := &hookRun{kind: k, cancel: cancel, done: make(chan struct{})}
	h.run = r
	if cmd == "" {
		// Not configured (peer_back, or hooks removed from the
		// configuration since the state was saved): nothing to do.
		cancel()
		close(r.done)
		h.endLocked(r, true, "")
		return
	}
	h.state = name + " " + peer + ": running"
	log := h.log.With("hook", name, "peer", peer)
	if k != hookCheck {
		log.Info("running hook", "command", cmd)
	}
	go func() {
		defer close(r.done)
		defer cancel()
		for try := 1; ; try++ {
			out, err := h.exec(ctx, cmd, name, peer)
			switch {
			case err == nil && k == hookCheck:
				log.Info("peer confirmed down by peer_lost_check", "output", trimOut(out))
				h.end(r, true, name+" "+peer+": confirmed down")
				return
			case err == nil:
				log.Info("hook succeeded", "tries", try, "output", trimOut(out))
				h.end(r, true, fmt.Sprintf("%s %s: done (%d tries)", name, peer, try))
				return
			case ctx.Err() == context.Canceled:
				return // stopped by apply, which said why
			case k == hookCheck:
				// Tried again every hookRetry while the peer stays
				// silent: said when the answer changes.
				if h.end(r, false, fmt.Sprintf("%s %s: not confirmed down (%v): %s", name, peer, err, trimOut(out))) {
					log.Info("peer not confirmed down: peer_lost waits", "err", err, "output", trimOut(out))
				}
				return
			}
			log.Warn("hook failed: retrying", "try", try, "err", err, "output", trimOut(out))
			state := fmt.Sprintf("%s %s: failed %d times, last: %v", name, peer, try, err)
			h.report(r, state)
			select {
			case <-ctx.Done():
				if ctx.Err() == context.DeadlineExceeded {
					log.Error("hook gave up", "after", hookGiveUp, "command", cmd)
					h.end(r, false, state+"; gave up")
				}
				return
			case <-time.After(hookRetry):
			}
		}
	}()
}

func (h *hooks) exec(ctx context.Context, cmd, name, peer string) ([]byte, error) {
	cctx, cancel := context.WithTimeout(ctx, hookDeadline)
	defer cancel()
	c := stack.Shell(cctx, cmd)
	c.Env = append(os.Environ(), "DUET_HOOK="+name, "DUET_NODE="+h.node, "DUET_PEER="+peer,
		"DUET_STATE_DIR="+filepath.Clean(h.stateDir))
	return c.CombinedOutput()
}
