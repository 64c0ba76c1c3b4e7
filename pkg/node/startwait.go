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
// of the machine says the peer can no longer take over from this copy
// (markSaved). A node that starts with the mark, not stale and not handed
// over, takes nothing over before a heartbeat of its peer settles it (or
// start_wait has passed, or the operator runs `duet prim`): the takeover
// checks fail with why. docs/DESIGN.md §7, "The start wait".

// peerSyncedMarkPath is the mark.
func (n *Node) peerSyncedMarkPath() string { return filepath.Join(n.cfg.StateDir, "peer-in-sync") }

// loadStartWait reads the mark at start, for the machine just loaded.
func (n *Node) loadStartWait(m cluster.Machine) {
	n.started.Store(bootNanos())
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
	if !forever && bootSince(n.started.Load()) >= d {
		if n.startWaitOver.CompareAndSwap(false, true) {
			n.log.Warn("cluster.start_wait passed without hearing the peer: this copy may serve; what the peer acknowledged after this node went down, if it served, is set aside when the two meet",
				"start_wait", n.cfg.Cluster.StartWait, "peer", n.cfg.Peer)
		}
		return true, ""
	}
	return false, fmt.Sprintf("not heard from the peer (%s) since its copy could take over from this one: it may have served since (cluster.start_wait %s); `duet prim` serves this copy now, setting aside what the peer acknowledged meanwhile",
		n.cfg.Peer, n.cfg.Cluster.StartWait)
}

// waitingForPeer says why this node, WAIT, takes nothing over on its own
// ("" otherwise): a stopped peer whose copy is newer (this copy counts as
// stale then: cluster.stepWait), or its start wait.
func (n *Node) waitingForPeer() string {
	m := n.machine.Load()
	if m == nil || m.State != cluster.Wait {
		return ""
	}
	if p := m.Peer; p.Seen && p.State == cluster.Stop && (!p.Stale || p.StaleHeld) && p.Epoch > m.Epoch {
		return fmt.Sprintf("%s is stopped and its copy is newer (epoch %d, here %d): `duet start` on it, or `duet prim --force` here, which sets aside what it has that this copy lacks",
			p.Label(), p.Epoch, m.Epoch)
	}
	if p := m.Peer; p.Seen && p.YieldsTo(*m) {
		return fmt.Sprintf("%s serves an older copy (epoch %d, here %d) in a term this node knew: it steps down for this copy once it hears this node (if it does not, it does not hear this node: check the path from here to it)",
			p.Label(), p.Epoch, m.Epoch)
	}
	if m.Stale || m.HandedOver {
		return ""
	}
	if ok, why := n.startWaitCheck(); !ok {
		return why
	}
	return ""
}

// markPeerSyncedLocked makes the mark for epoch before a heartbeat says
// the peer is in sync, and reports whether it is made. Only for a term
// whose PRIM state is saved (markSaved): a save that ended the term
// removes the mark, and a heartbeat built from the machine read before
// must not make it again. markMu is held.
func (n *Node) markPeerSyncedLocked(epoch uint64) bool {
	if epoch == 0 || n.savedPrim != epoch {
		return false
	}
	if n.markOn && n.markEpoch == epoch {
		return true
	}
	if err := n.makeMarkLocked(epoch); err != nil {
		if n.markErr.CompareAndSwap(false, true) {
			n.log.Error("cannot mark the peer in sync in the state directory: the heartbeats do not say synced, so the peer stays stale and cannot take over (no failover) until it can", "err", err)
		}
		return false
	}
	n.markErr.Store(false)
	return true
}

// makeMarkLocked makes the mark for epoch (markMu held).
func (n *Node) makeMarkLocked(epoch uint64) error {
	n.markOn = true // the file may exist even if this fails: a save removes it
	f, err := os.OpenFile(n.peerSyncedMarkPath(), os.O_WRONLY|os.O_CREATE, 0o600)
	if err == nil {
		err = f.Close()
	}
	if err == nil {
		err = syncDir(n.cfg.StateDir)
	}
	if err != nil {
		return err
	}
	n.markEpoch = epoch
	return nil
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
//
// An ALONE term whose peer was in sync when lost (aloneFromSynced) that
// ends without a handover — stepped down isolated (WAIT), stopped, or
// the daemon stopped (leftAlone) — frees the VIP while that peer, cut off
// but alive, may still be in sync and take over: the mark is made again,
// and a node stepped down waits for its peer as after a start. Only
// within rearmWindow of the loss: a SECOND that lost its primary checks
// once, and a failed check (the VIP answered) makes it stale; an ALONE
// term that ends days later (the peer's host died, then the witness
// missed two pings) must not wait for ever (from a review).
func (n *Node) markSaved(m cluster.Machine) {
	n.markMu.Lock()
	defer n.markMu.Unlock()
	prevPrim := n.savedPrim
	n.savedPrim = 0
	if m.State.Serving() {
		// Served since start (`duet prim`, say): no start wait left.
		n.startWait.Store(false)
	}
	fromSynced := n.aloneFromSynced && time.Since(n.aloneSince) < n.rearmWindow()
	n.aloneFromSynced = false
	keep := false
	switch {
	case m.State == cluster.Prim:
		n.savedPrim = m.Epoch
		keep = n.markEpoch == m.Epoch
		if !keep && m.Peer.Seen && m.Peer.Handover {
			// A term handed over by the peer: the giver takes the role
			// back if this node dies before it hears it serve
			// (cluster.step), as a SECOND takes over: marked from its
			// start (TestTakebackThenReceiverBackAloneWaits).
			if err := n.makeMarkLocked(m.Epoch); err != nil {
				n.log.Error("cannot mark in the state directory that the peer, which handed the role over, may take it back: a restart of this node alone would not wait for it", "err", err)
			}
			keep = true
		}
	case m.State == cluster.Alone:
		// Only an ALONE term that follows a PRIM one with the mark: not
		// one taken over alone (`duet prim` in a start wait, say).
		// Nor one whose peer said, before it was lost, that it stops
		// (its daemon's last heartbeats: STOP, stale).
		stopped := m.Peer.State == cluster.Stop && m.Peer.Stale
		if fromSynced && !stopped {
			n.aloneFromSynced = true
		} else if prevPrim != 0 && n.markOn && n.markEpoch == prevPrim && !stopped {
			n.aloneFromSynced, n.aloneSince = true, time.Now()
		}
	case m.Stale:
	case m.HandedOver:
		keep = true
	case m.State == cluster.Wait, m.State == cluster.Stop && fromSynced:
		keep = true
		if fromSynced {
			n.markAgainLocked(m)
		}
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
}

// markAgainLocked makes the mark again for an ALONE term, whose peer was
// in sync when lost, that ends without a handover (see markSaved), and
// has this node wait for the peer before it takes over again.
func (n *Node) markAgainLocked(m cluster.Machine) {
	if err := n.makeMarkLocked(m.Epoch); err != nil {
		n.log.Error("cannot mark in the state directory that the peer, lost while in sync, may take over: a restart of this node alone would not wait for it", "err", err)
	}
	n.started.Store(bootNanos())
	n.peerHeard.Store(false)
	n.startWaitOver.Store(false)
	if d, forever := n.cfg.Cluster.StartWaitFor(); forever || d > 0 {
		n.startWait.Store(true)
		n.log.Info("left the role without a handover after losing a peer that was in sync: it may take over now, so this node takes nothing over before it hears it (cluster.start_wait)",
			"start_wait", n.cfg.Cluster.StartWait)
	}
}

// rearmWindow bounds how long after losing a peer in sync an ALONE term
// that ends without a handover makes the mark again (markSaved): the
// peer's takeover checks, fencing included (30 s at most), run within it.
// A peer whose host stalled for longer and then checked finds the VIP
// free: not covered.
func (n *Node) rearmWindow() time.Duration { return n.cfg.Cluster.Timeout + time.Minute }

// leftAlone: the daemon stops while ALONE (SIGTERM), without a save: the
// mark is made again if the lost peer was in sync (see markSaved).
func (n *Node) leftAlone() {
	n.markMu.Lock()
	defer n.markMu.Unlock()
	if n.aloneFromSynced && time.Since(n.aloneSince) < n.rearmWindow() {
		if err := n.makeMarkLocked(n.markEpoch); err != nil {
			n.log.Error("cannot mark in the state directory that the peer, lost while in sync, may take over: a restart of this node alone would not wait for it", "err", err)
		}
	}
}

// peerEndsStartWait says whether heartbeat p settles the start wait of a
// node whose copy has epoch: the peer serves (this copy turns stale), its
// copy is stale, or it has not served after this node's term (a term
// draws a newer epoch). A peer with a newer copy that does not serve yet
// may die again before it does: the wait goes on.
func peerEndsStartWait(p cluster.Peer, epoch uint64) bool {
	return p.State.Serving() || p.Stale || p.Epoch <= epoch
}
