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
	if _, err := os.Stat(n.peerSyncedMarkPath()); err != nil {
		return
	}
	if _, err := os.Stat(n.statePath()); err != nil {
		// cluster.json moved away (a fresh start, or only the stale
		// mark): the mark belongs to a state that is gone.
		n.log.Info("removing the peer-in-sync mark: no cluster state beside it", "mark", n.peerSyncedMarkPath())
		if err := os.Remove(n.peerSyncedMarkPath()); err == nil {
			syncDir(n.cfg.StateDir)
		} else {
			n.markMu.Lock()
			n.markOn = true // no wait now; the next save tries again
			n.markMu.Unlock()
		}
		return
	}
	n.markMu.Lock()
	n.markOn, n.markEpoch = true, m.Epoch
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

// waitingForPeer says why this node, WAIT and not stale, takes nothing
// over on its own ("" otherwise): its start wait, or a stopped peer whose
// copy is newer (cluster.stepWait does not serve over it).
func (n *Node) waitingForPeer() string {
	m := n.machine.Load()
	if m == nil || m.State != cluster.Wait || m.Stale || m.HandedOver {
		return ""
	}
	if p := m.Peer; p.Seen && p.State == cluster.Stop && !p.Stale && p.Epoch > m.Epoch {
		return fmt.Sprintf("%s is stopped and its copy is newer (epoch %d, here %d): `duet start` on it, or `duet prim` here, which sets aside what it has that this copy lacks",
			p.Label(), p.Epoch, m.Epoch)
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
		// The file may exist even so: a later save removes it.
		n.markOn = true
		if n.markErr.CompareAndSwap(false, true) {
			n.log.Error("cannot mark the peer in sync in the state directory: the heartbeats do not say synced, so the peer stays stale and cannot take over (no failover) until it can", "err", err)
		}
		return false
	}
	n.markErr.Store(false)
	n.markOn, n.markEpoch = true, epoch
	n.markedEpoch.Store(epoch)
	return true
}

// markSaved follows a save of m. The mark stays while the peer may still
// take over from this copy: the term it was made in (PRIM, same epoch),
// WAIT (a node in its start wait), handed over (HandedOver stops this
// node serving on its own anyway, and the heartbeats of the handover say
// "synced" only with the mark), and STOP unless the peer's last word,
// current (staleCurrent), is that it is stale: this node may not have
// heard the peer turn SECOND before its stop, and that peer, hearing
// STOP, may serve. It goes with a new term, ALONE (the peer was lost and
// could not take over from the node holding the VIP), SECOND or a stale
// copy (neither serves on its own).
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
	case m.Stale:
	case m.HandedOver, m.State == cluster.Wait:
		keep = true
	case m.State == cluster.Stop:
		p := m.Peer
		keep = !(p.Seen && p.Stale && n.staleCurrent(p))
	}
	if keep || !n.markOn {
		return
	}
	if err := os.Remove(n.peerSyncedMarkPath()); err != nil && !errors.Is(err, os.ErrNotExist) {
		// Left behind, it only makes a later start wait for the peer.
		n.log.Warn("cannot remove the peer-in-sync mark", "err", err)
		return
	}
	syncDir(n.cfg.StateDir)
	n.markOn, n.markEpoch = false, 0
	n.markedEpoch.Store(0)
}

// peerEndsStartWait says whether heartbeat p settles the start wait of a
// node whose copy has epoch: the peer serves (this copy turns stale), its
// copy is stale, or it has not served after this node's term (a term
// draws a newer epoch). A peer with a newer copy that does not serve yet
// may die again before it does: the wait goes on.
func peerEndsStartWait(p cluster.Peer, epoch uint64) bool {
	return p.State.Serving() || p.Stale || p.Epoch <= epoch
}
