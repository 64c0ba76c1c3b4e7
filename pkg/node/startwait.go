package node

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/duet-ha/duet/pkg/cluster"
)

// The start wait (cluster.start_wait, DRBD's wfc-timeout).
//
// A site can lose its power node by node: the primary dies, the
// secondary takes over and acknowledges writes alone, then dies too. If
// only the old primary comes back, its saved state says it served last:
// without its peer it would serve its older copy, and the writes the
// other acknowledged would be set aside when the two meet. Two nodes
// cannot tell this apart from a plain crash of the primary while its
// peer was down, except by what the primary knew when it went down:
// whether its peer was in sync, and so able to take over after it.
//
// A primary says "synced" in its heartbeats (which turn the peer SECOND,
// able to take over) only once a mark in the state directory says so:
// the mark (an empty file, which needs no data block on a full disk) is
// made before the first such heartbeat of a term and removed when a save
// of the machine says the peer can no longer take over from this copy: a
// new term, ALONE, STOP, SECOND or stale. A node that starts with the
// mark, not stale and not handed over, takes nothing over before it has
// heard its peer (or start_wait has passed, or the operator runs `duet
// prim`): the takeover checks fail with why.

// peerSyncedMarkPath is the mark.
func (n *Node) peerSyncedMarkPath() string { return filepath.Join(n.cfg.StateDir, "peer-in-sync") }

// loadStartWait reads the mark at start, for the machine just loaded.
func (n *Node) loadStartWait(m cluster.Machine) {
	n.started = time.Now()
	_, err := os.Stat(n.peerSyncedMarkPath())
	if err != nil {
		return
	}
	n.markMu.Lock()
	n.markEpoch = m.Epoch
	n.markMu.Unlock()
	n.markedEpoch.Store(m.Epoch)
	if m.Stale || m.HandedOver {
		return
	}
	if d, forever := n.cfg.Cluster.StartWaitFor(); forever || d > 0 {
		n.startWait.Store(true)
		n.log.Info("this node served last with its peer in sync: it takes nothing over before it hears the peer, which may have served after it (cluster.start_wait)",
			"start_wait", n.cfg.Cluster.StartWait, "peer", n.cfg.Peer)
	}
}

// startWaitCheck is the first takeover check: false while this node
// waits for its peer after a start (see above).
func (n *Node) startWaitCheck() (bool, string) {
	if !n.startWait.Load() || n.peerHeard.Load() {
		return true, ""
	}
	d, forever := n.cfg.Cluster.StartWaitFor()
	if !forever && time.Since(n.started) >= d {
		if n.startWaitOver.CompareAndSwap(false, true) {
			n.log.Warn("cluster.start_wait passed without hearing the peer: this copy may serve; what the peer acknowledged after this node went down, if it served, is set aside when the two meet",
				"start_wait", n.cfg.Cluster.StartWait, "peer", n.cfg.Peer)
		}
		return true, ""
	}
	return false, fmt.Sprintf("waiting for the peer (%s, cluster.start_wait %s): this node served last with the peer in sync, and the peer may have served after it went down; `duet prim` serves this copy now, setting aside what the peer acknowledged since",
		n.cfg.Peer, n.cfg.Cluster.StartWait)
}

// startWaiting says why this node does not take over on its own, while
// it waits for its peer after a start ("" otherwise).
func (n *Node) startWaiting() string {
	if m := n.machine.Load(); m == nil || m.State != cluster.Wait {
		return ""
	}
	if ok, why := n.startWaitCheck(); !ok {
		return why
	}
	return ""
}

// markPeerSynced makes the mark for epoch before a heartbeat says the
// peer is in sync, and reports whether it is made. Only for a term whose
// PRIM state is saved (markSaved): a save that ended the term removes the
// mark, and a heartbeat built from the machine read before must not make
// it again.
func (n *Node) markPeerSynced(epoch uint64) bool {
	if n.markedEpoch.Load() == epoch && epoch != 0 {
		return true
	}
	n.markMu.Lock()
	defer n.markMu.Unlock()
	if n.savedPrim != epoch || epoch == 0 {
		return false
	}
	err := func() error {
		f, err := os.OpenFile(n.peerSyncedMarkPath(), os.O_WRONLY|os.O_CREATE, 0o600)
		if err != nil {
			return err
		}
		if err := f.Close(); err != nil {
			return err
		}
		return syncDir(n.cfg.StateDir)
	}()
	if err != nil {
		if n.markErr.CompareAndSwap(false, true) {
			n.log.Error("cannot mark the peer in sync in the state directory: the heartbeats do not say synced, so the peer does not take over (it resyncs)", "err", err)
		}
		return false
	}
	n.markErr.Store(false)
	n.markEpoch = epoch
	n.markedEpoch.Store(epoch)
	return true
}

// markSaved follows a save of m: the mark stays for the term it was made
// in (PRIM, same epoch) and while WAIT, not stale and not handed over
// (a node in its start wait), or STOP from its start wait; any other
// save removes it.
func (n *Node) markSaved(m cluster.Machine) {
	n.markMu.Lock()
	defer n.markMu.Unlock()
	n.savedPrim = 0
	if m.State.Serving() {
		// Served since start (`duet prim`, say): no start wait left.
		n.startWait.Store(false)
	}
	keep := false
	switch {
	case m.State == cluster.Prim:
		n.savedPrim = m.Epoch
		keep = n.markEpoch == m.Epoch
	case m.Stale || m.HandedOver:
	case m.State == cluster.Wait:
		keep = true
	case m.State == cluster.Stop:
		// `duet stop` during the start wait: a `duet start` waits again.
		// A primary stopped cleanly had no peer in sync, or handed over.
		keep = n.startWait.Load() && !n.peerHeard.Load()
	}
	if keep || n.markEpoch == 0 {
		return
	}
	if err := os.Remove(n.peerSyncedMarkPath()); err != nil && !errors.Is(err, os.ErrNotExist) {
		// Left behind, it only makes a later start wait for the peer.
		n.log.Warn("cannot remove the peer-in-sync mark", "err", err)
		return
	}
	syncDir(n.cfg.StateDir)
	n.markEpoch = 0
	n.markedEpoch.Store(0)
}
