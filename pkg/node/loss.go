package node

import (
	"fmt"
	"time"
)

// hookKind names a command the hooks run.
type hookKind int

const (
	hookNone  hookKind = iota
	hookCheck          // peer_lost_check: is the silent peer down?
	hookLost           // peer_lost: the peer is down (the k3s module taints its node)
	hookBack           // peer_back: the peer is back (the taint goes)
)

func (k hookKind) String() string {
	return [...]string{"none", "peer_lost_check", "peer_lost", "peer_back"}[k]
}

// loss is what the hooks know of the peer this node lost. A loss is only
// a suspicion until the peer is confirmed down: a daemon restarting on
// the peer or a short link failure also silence it, and peer_lost (the
// out-of-service taint, which has Kubernetes delete the node's pods) is
// for a node that is really down. The exported fields are saved in
// hooks.json: a restarted daemon still owes the peer_back of a peer_lost
// it ran, and goes on counting the silence of a peer it suspects.
type loss struct {
	Peer string `json:"peer,omitempty"`
	// Suspect: the peer was lost and is not confirmed down; it has been
	// silent since Since.
	Suspect bool      `json:"suspect,omitempty"`
	Since   time.Time `json:"since,omitzero"`
	// Owed: peer_lost was started and peer_back has not succeeded since;
	// Done: that peer_lost succeeded.
	Owed bool `json:"back_owed,omitempty"`
	Done bool `json:"lost_done,omitempty"`

	// Not saved: a restarted daemon confirms the peer down again.
	fenced    bool      // the fencing command succeeded for this loss
	confirmed bool      // peer_lost_check succeeded for this loss
	nextCheck time.Time // no peer_lost_check before
}

// lossPolicy says what confirms a peer down without fencing.
type lossPolicy struct {
	after time.Duration // silence needed
	check bool          // and peer_lost_check must succeed
	retry time.Duration // between two tries of the check
}

// peerView is what the cluster loop sees at a tick.
type peerView struct {
	now     time.Time
	serving bool // this node serves
	heard   bool // the peer's heartbeats are heard
	back    bool // the peer is a mirror of this node in sync, or serves itself
}

// hookAct is what the hooks runner does after a step: stop the command
// running, then start another (hookNone: none), and log why.
type hookAct struct {
	stop  bool
	start hookKind
	say   string
}

// lost takes in that the serving node lost peer, silent since since;
// fenced says the fencing command succeeded for this loss.
func (l loss) lost(peer string, since time.Time, fenced bool, running hookKind) (loss, hookAct) {
	switch {
	case l.Suspect:
		l.fenced = l.fenced || fenced
		return l, hookAct{}
	case l.Owed && running != hookBack:
		// Still down as far as the hooks know: peer_lost ran (or
		// runs) and peer_back is owed.
		return l, hookAct{}
	}
	// A peer_back still running is stopped: the taint may still be on,
	// and stays owed.
	l.Peer, l.Suspect, l.Since, l.fenced, l.confirmed, l.nextCheck = peer, true, since, fenced, false, time.Time{}
	return l, hookAct{stop: running == hookBack, say: "peer lost: peer_lost waits until it is confirmed down"}
}

// step decides at a tick: a suspected peer heard again is forgotten
// (nothing ran); one fenced, or silent long enough and checked, is
// confirmed down (peer_lost); a peer owed a peer_back gets it once it is a
// mirror again or serves.
func (l loss) step(v peerView, running hookKind, p lossPolicy) (loss, hookAct) {
	if l.Suspect {
		if v.heard {
			l.Suspect, l.fenced, l.confirmed = false, false, false
			return l, hookAct{stop: running == hookCheck, say: "peer heard again before it was confirmed down: peer_lost not run"}
		}
		if !v.serving {
			return l, hookAct{}
		}
		silent := v.now.Sub(l.Since) >= p.after
		why := ""
		switch {
		case l.fenced:
			why = "the fencing command succeeded"
		case l.confirmed:
			why = fmt.Sprintf("silent for %s and peer_lost_check succeeded", p.after)
		case silent && !p.check:
			why = fmt.Sprintf("silent for %s", p.after)
		case silent && running == hookNone && !v.now.Before(l.nextCheck):
			l.nextCheck = v.now.Add(p.retry)
			return l, hookAct{start: hookCheck}
		default:
			return l, hookAct{}
		}
		l.Suspect, l.Owed, l.Done = false, true, false
		return l, hookAct{stop: running != hookNone, start: hookLost, say: "peer confirmed down: " + why}
	}
	if l.Owed && v.heard && v.back && running != hookBack {
		return l, hookAct{stop: running != hookNone, start: hookBack, say: "peer back"}
	}
	return l, hookAct{}
}

// restarted is the loss as a new daemon takes it up: a peer_lost that
// had not succeeded runs again only once the peer is confirmed down
// again; a peer_back owed stays owed.
func (l loss) restarted() loss {
	if l.Owed && !l.Done {
		l.Suspect = true
	}
	return l
}

// describe says where the loss stands, for duet status.
func (l loss) describe(now time.Time, p lossPolicy) string {
	switch {
	case l.Suspect:
		need := fmt.Sprintf("%s of silence", p.after)
		if p.check {
			need += " and peer_lost_check"
		}
		s := fmt.Sprintf("%s silent for %s, not confirmed down: peer_lost waits for fencing or %s", l.Peer, now.Sub(l.Since).Round(time.Second), need)
		if l.Owed {
			s += "; peer_back owed"
		}
		return s
	case l.Owed && l.Done:
		return l.Peer + " confirmed down, peer_lost done: peer_back owed once it is a mirror again"
	case l.Owed:
		return l.Peer + " confirmed down, peer_lost not done yet: peer_back owed once it is a mirror again"
	}
	return ""
}
