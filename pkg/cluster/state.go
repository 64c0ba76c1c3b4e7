// Package cluster decides a node's role from heartbeats, checks and
// operator commands. Step is a pure function (machine, event) → (machine,
// actions): the daemon feeds it events and carries out the actions.
package cluster

import (
	"fmt"
	"time"
)

// State is a node's role in the pair.
type State uint8

// Node states (DESIGN.md "Node states").
const (
	Stop   State = iota // duet not running its module
	Wait                // running, not allowed to serve
	Second              // in sync with the peer, ready to take over
	Prim                // owns the VIP, runs the services, ships to the peer
	Alone               // Prim without a peer: changes tracked for a resync
)

var stateNames = [...]string{"STOP", "WAIT", "SECOND", "PRIM", "ALONE"}

func (s State) String() string {
	if int(s) < len(stateNames) {
		return stateNames[s]
	}
	return fmt.Sprintf("State(%d)", s)
}

// Serving reports whether the state owns the VIP and the services.
func (s State) Serving() bool { return s == Prim || s == Alone }

// Peer is what the last heartbeat said about the other node.
type Peer struct {
	Seen      bool   // heartbeats arrive
	Name      string // its node name
	State     State
	Epoch     uint64
	Stale     bool // its copy may be older than ours
	Preferred bool
	// Synced is set by a serving peer when our copy is in sync with it
	// (its replication streams, no full sync pending).
	Synced bool
	// Handover is set by a peer that gave up the primary role to us.
	Handover bool
	// Shared is set by a serving peer whose term we have known (see
	// Machine.Shared).
	Shared bool
	// StaleHeld is set by a peer that says stale only because a check
	// found the role held elsewhere (Machine.StaleHeld).
	StaleHeld bool
	// ServiceFailed is set by a peer that gave the role up because a
	// service failed there (Machine.ServiceFailed).
	ServiceFailed bool
	// Yields is set in every heartbeat of a version that waits for a
	// Shared primary to step down for its newer copy (Peer.YieldsTo). A
	// Shared primary steps down only for such a peer: one of an older
	// version would count its copy stale on the heartbeats the primary
	// sends while it steps down, and then neither copy would serve.
	Yields bool
	// Boot, Seq and Time identify the heartbeat (see Heartbeat); EchoBoot
	// and EchoTime name the last heartbeat of ours whose state the peer
	// had applied when it sent it (Guard.Applied).
	Boot, Seq uint64
	Time      time.Duration
	EchoBoot  uint64
	EchoTime  time.Duration
}

// Machine is one node's memory of the cluster.
type Machine struct {
	Name string
	// ID is this node's number in the epochs it draws, 1 or 2: different
	// on the two nodes of a pair (see nextEpoch).
	ID        uint8
	State     State
	Epoch     uint64 // data generation: drawn anew on takeovers (nextEpoch)
	Stale     bool   // our copy may be older than the peer's
	Preferred bool   // the primary when both copies are equal
	// Resyncing names a replicated directory whose copy a resync is
	// rewriting (the daemon sets it before each step): until the resync
	// completes the copy is half old, half new, and must not serve.
	Resyncing string
	// HandedOver is set after giving the role away (a swap, a stop, a
	// failed service): until the peer is heard serving (this copy is
	// stale then), or WAIT without having served (see stepWait), or lost
	// after being heard in this run (see step), this node claims nothing.
	// It is saved: a node that restarts has not heard the peer since,
	// and the peer may have served alone meanwhile and acknowledged
	// writes this copy lacks (TestHandoverGiverRestartedDoesNotServeAlone).
	HandedOver bool
	Checking   bool // takeover checks in progress
	// Shared: the peer has known this node's serving term: it was heard
	// at this node's epoch (SECOND in sync, say), and this node serves
	// on in that term, alone or not (PRIM -> ALONE draws nextEpoch(1) and
	// keeps it). A newer epoch that such a peer holds later was drawn by
	// a takeover after this term began (nextEpoch(2) from at least this
	// term's epoch): met WAIT and not stale, that peer served while this
	// node was not heard (its host stalled, a cut hid it and the VIP),
	// and then stopped serving before the two met (its daemon restarted,
	// or it left the role). This node steps down, as it would had the
	// peer still been serving (TestResumedPrimaryServesOverNewerPeer).
	// A term of a takeover that the peer has not known yet is not
	// Shared: a newer epoch the peer holds may be of an earlier term,
	// drawn without knowing this one's
	// (TestTakeoverTermStaysOverOlderTakeover). Said in the heartbeats,
	// so that the peer waits for the step down rather than counting its
	// own newer copy stale (Peer.YieldsTo).
	Shared bool
	// StaleHeld: this copy counts as stale only because a takeover
	// check found the role held elsewhere (another host answers for the
	// VIP) while it was WAIT and not stale: who holds it, and whether it
	// writes what this copy lacks, is unknown until the peer is heard.
	// Heard serving, the peer makes the copy stale for good (StaleHeld
	// cleared), unless it steps down for it (Peer.YieldsTo); heard WAIT,
	// stale for its own reasons, with an older epoch, it held the role in
	// a term older than this copy's and gave it up (a Shared primary that
	// stepped down for this copy, whose heartbeats this node could not
	// accept while it did: its loop echoes this node's run only once the
	// step down is carried out): this copy is not stale
	// (TestStalledPrimaryResumesBehindRestartedPeer in the lab). Saved
	// with Stale, and said in the heartbeats.
	StaleHeld bool
	// ServiceFailed: this node gave the role up because a service failed
	// here beyond its restarts, and has not served since. Said in the
	// heartbeats: the peer, whose service then fails too, keeps the role
	// rather than handing it back (a damaged table or a bad config in
	// the replicated data fails on both nodes: the role moved back and
	// forth for ever, TestServiceDownPingPong), as Pacemaker's migration
	// threshold keeps a resource off a node where it failed; and
	// failback (cluster.prefer) does not hand it back either. `duet swap`
	// still does: the operator says the service is mended, and so does
	// `duet start` after a stop. Not saved: a restart (the daemon, the
	// host) starts afresh.
	ServiceFailed bool
	// ServiceDown says why a service failed here beyond its restarts
	// while this node kept the role (no peer in sync, or the peer marked
	// ServiceFailed): the stack reports a failure once, so the role moves
	// when the peer can take it, later (TestServiceKeptDeadNotRetriedWhenPeerCleared,
	// from a review). Cleared when the node leaves the role or serves anew.
	ServiceDown string
	Peer        Peer
	// undo is what a handover's receiver was before it served
	// (takeHandover), for a serve that fails (EvServeFailed, the step
	// right after it): a term that could not take the role was never
	// published and released nothing, so the node stops with the copy's
	// state from before it (see stepServing). Only ever set in the
	// result of the step that served.
	undo prior
}

// prior is a Machine's state before serve (Machine.undo).
type prior struct {
	set                                         bool
	epoch                                       uint64
	stale, staleHeld, handedOver, serviceFailed bool
}

// Kind of event.
type Kind uint8

// Events.
const (
	EvPeer        Kind = iota + 1 // a heartbeat (Event.Peer)
	EvPeerLost                    // no heartbeat for the fault-detection timeout
	EvTick                        // periodic: retries waiting decisions
	EvChecked                     // takeover checks done (Event.OK, Event.Why)
	EvIsolated                    // serving, peer lost and the witness unreachable
	EvServiceDown                 // a service failed beyond its local restarts
	EvServeFailed                 // the role could not be taken (Event.Why)
	EvCmdStart
	EvCmdStop
	EvCmdPrim // Event.Force
	EvCmdSecond
	EvCmdSwap
	EvDiskFailed // a replicated directory's filesystem fails writes (Event.Why)
)

// Event is one input of the machine.
type Event struct {
	Kind  Kind
	Peer  Peer   // EvPeer
	OK    bool   // EvChecked
	Why   string // EvChecked, EvServiceDown, EvDiskFailed
	Force bool   // EvCmdPrim
	// Held (EvChecked, not OK): a check found the role held elsewhere
	// (another host answers for the VIP): whoever holds it may write
	// what this copy lacks.
	Held bool
}

// Action kind.
type Do uint8

// Actions the daemon carries out, in order.
const (
	DoServe   Do = iota + 1 // VIP up, capture and ship, start services
	DoUnserve               // stop services, ship everything, VIP down
	DoCheck                 // run takeover checks, then send EvChecked
	DoPersist               // save State and Epoch
	DoLog                   // Action.Msg for the operator
	DoRefuse                // the command is refused: Action.Msg says why
)

// Action is one thing to do.
type Action struct {
	Do  Do
	Msg string
	// Grace, on a DoCheck, runs the checks only after a further
	// cluster.timeout: the peer, last heard SECOND, may be taking over
	// at the same moment (see stepWait).
	Grace bool
	// Unpublished, on a DoServe: the serving state is published only
	// once the VIP and the capture are held; until then the node says
	// what it said before (Machine.takeHandover). Otherwise it is
	// published before serve begins.
	Unpublished bool
}

func logf(format string, a ...any) Action { return Action{Do: DoLog, Msg: fmt.Sprintf(format, a...)} }
func refuse(format string, a ...any) Action {
	return Action{Do: DoRefuse, Msg: fmt.Sprintf(format, a...)}
}

// wins says whether m should serve rather than its (visible, not
// serving) peer: a copy that may be stale never wins; then the newer
// epoch; then the preferred node; then the smaller name.
func (m Machine) wins() bool {
	p := m.Peer
	switch {
	case m.Stale:
		return false
	case p.Stale:
		return true
	case m.Epoch != p.Epoch:
		return m.Epoch > p.Epoch
	case m.Preferred != p.Preferred:
		return m.Preferred
	}
	return m.Name < p.Name
}

// nextEpoch draws an epoch newer than both copies' and unique to this
// node: a counter ahead of both epochs' counters in the high bits, the
// node's ID in the low 8. Two nodes that take over independently from the
// same epoch draw different epochs, so that the epochs still tell the two
// copies apart when they meet. A takeover moves the counter two ahead, a
// primary that loses its peer one: when a node takes over from a primary
// that is in fact alive (a network split), the taker's epoch is the newer
// one. An epoch of an older version (a plain counter, below 256 in
// practice) is below any epoch drawn after it.
func (m Machine) nextEpoch(ahead uint64) uint64 {
	return (max(m.Epoch, m.Peer.Epoch)>>8+ahead)<<8 | uint64(m.ID)
}

// serve moves m to PRIM (peer visible) or ALONE, with a new epoch.
func (m Machine) serve(why string) (Machine, []Action) {
	m.Epoch = m.nextEpoch(2)
	m.Stale, m.StaleHeld, m.HandedOver, m.Checking, m.Shared, m.ServiceFailed, m.ServiceDown = false, false, false, false, false, false, ""
	if m.Peer.Seen {
		m.State = Prim
	} else {
		m.State = Alone
	}
	return m, []Action{{Do: DoPersist}, logf("becoming %s (epoch %d): %s", m.State, m.Epoch, why), {Do: DoServe}}
}

// takeHandover serves a handover: as serve, but the daemon publishes the
// serving state only once the role is taken (Action.Unpublished), and a
// serve that fails goes back to the copy's state from before (undo): the
// giver, which never heard this node serve, then takes the role back
// (stepWait: a peer handed the role is STOP and never served). Only
// here: every other serve is published at once, as a peer deciding on
// this node's last published state must not take it for one that does
// not serve while it does (a giver's takeback published late let a
// receiver started meanwhile win over its WAIT and serve beside it, a
// review: TestServeFailedReceiverStartedDuringTakebackBothServe).
func (m Machine) takeHandover(why string) (Machine, []Action) {
	u := prior{set: true, epoch: m.Epoch, stale: m.Stale, staleHeld: m.StaleHeld, handedOver: m.HandedOver, serviceFailed: m.ServiceFailed}
	m, acts := m.serve(why)
	m.undo = u
	for i := range acts {
		if acts[i].Do == DoServe {
			acts[i].Unpublished = true
		}
	}
	return m, acts
}

// unserve leaves a serving state for to. The new state is saved before
// the role is let go, which can take the services' stop timeouts: a crash
// meanwhile must not leave PRIM on disk, from which a restart would serve
// a copy it had just been told is not the reference (a split brain's
// loser; TestSplitBrainStepDownStaleOnDiskBeforeUnserve). The peer hears
// of it only once the role is let go (the heartbeats say what the loop
// publishes after the actions).
func (m Machine) unserve(to State, why string) (Machine, []Action) {
	m.State = to
	m.Checking, m.Shared, m.ServiceDown = false, false, ""
	return m, []Action{logf("leaving the primary role for %s: %s", to, why), {Do: DoPersist}, {Do: DoUnserve}}
}

func (m Machine) to(s State, why string) (Machine, []Action) {
	if m.State == s {
		return m, nil
	}
	old := m.State
	m.State = s
	return m, []Action{{Do: DoPersist}, logf("%s -> %s: %s", old, s, why)}
}

// Step applies one event.
func Step(m Machine, ev Event) (Machine, []Action) {
	if ev.Kind != EvServeFailed {
		m.undo = prior{}
	}
	if m.Resyncing == "" || m.State.Serving() || m.Stale && m.State != Second {
		return step(m, ev)
	}
	// A copy that a resync is rewriting is neither in sync nor whole: it
	// counts as stale (never serves unless forced) until the serving peer
	// says it is in sync again.
	m.Stale, m.StaleHeld = true, false
	why := fmt.Sprintf("directory %s: this copy is mid-resync (inconsistent): not taking over until the resync completes", m.Resyncing)
	if m.State == Second {
		m.State = Wait
		why = "SECOND -> WAIT: " + why
	}
	pre := []Action{{Do: DoPersist}, logf("%s", why)}
	m, acts := step(m, ev)
	return m, append(pre, acts...)
}

func step(m Machine, ev Event) (Machine, []Action) {
	if ev.Kind == EvPeerLost && m.HandedOver && m.Peer.Seen && m.State == Wait {
		// The receiver, heard since this node handed the role over (in
		// this run), is lost without having been heard serving. Had it
		// served, its calls would wait for this node until it heard this
		// node say stale (which it says once it hears the receiver
		// serve) or lost this node: it released nothing this copy lacks
		// but across a cut between the two, which the takeover checks
		// guard as in any other. This node may take the role back
		// (`duet swap` whose receiver dies: TestHandoverThenPeerLost).
		// Not a node that has not heard the receiver since it started:
		// it was down meanwhile, and the receiver may have served alone.
		// A receiver heard with a newer epoch served: this copy is behind.
		// One that served unheard (a stalled host, a one-way cut) drew
		// nextEpoch(2) from the epoch this node knows, and nextEpoch(1)
		// more once ALONE: this node's takeover must draw a newer one, as
		// every takeover does over the copy it replaces, or on meeting it
		// this node would step down and lose what it acknowledged since
		// (TestHandoverTakebackEpochNewerThanReceiver, from a review).
		//
		// Its checks wait a grace: see stepWait.
		m.HandedOver = false
		m.Stale = m.Stale || m.Peer.Epoch > m.Epoch
		m.Peer.Epoch = max(m.Peer.Epoch, m.nextEpoch(2))
		m, acts := step(m, ev)
		return m, append([]Action{{Do: DoPersist}}, acts...)
	}
	switch ev.Kind {
	case EvPeer:
		m.Peer = ev.Peer
		m.Peer.Seen = true
	case EvPeerLost:
		m.Peer.Seen = false
		m.Peer.Synced = false
	case EvCmdStart:
		if m.State != Stop {
			return m, []Action{refuse("already started (%s)", m.State)}
		}
		// Stopped and started by the operator (who mended the service):
		// a failed service here no longer keeps the role from it.
		m.ServiceFailed = false
		return m.to(Wait, "started by the operator")
	case EvCmdStop:
		switch {
		case m.State == Stop:
			return m, []Action{refuse("already stopped")}
		case m.State.Serving() && m.peerReady():
			m.HandedOver = true
			return m.unserve(Stop, "stopped by the operator; "+m.Peer.Name+" takes over")
		case m.State.Serving():
			return m.unserve(Stop, "stopped by the operator (no peer in sync: nothing serves now)")
		}
		if m.Peer.Seen && m.Peer.State.Serving() && !m.Peer.YieldsTo(m) {
			// The serving peer writes on without this copy: stale, and
			// said so, so that the peer may release what it cannot ship.
			// Not one that steps down for this newer copy (YieldsTo).
			m.Stale, m.StaleHeld, m.HandedOver = true, false, false
		}
		return m.to(Stop, "stopped by the operator")
	}
	if m.State == Stop {
		if ev.Kind == EvCmdPrim || ev.Kind == EvCmdSecond || ev.Kind == EvCmdSwap {
			return m, []Action{refuse("duet is stopped on this node: run `duet start` first")}
		}
		if ev.Kind == EvPeer && ev.Peer.State.Serving() && (!m.Stale || m.StaleHeld || m.HandedOver) && !ev.Peer.YieldsTo(m) {
			m.Stale, m.StaleHeld, m.HandedOver = true, false, false
			return m, []Action{{Do: DoPersist}}
		}
		return m, nil
	}
	switch m.State {
	case Wait:
		return m.stepWait(ev)
	case Second:
		return m.stepSecond(ev)
	}
	return m.stepServing(ev)
}

// YieldsTo says whether p, serving, steps down for m's copy on hearing
// it (see Machine.Shared): m has known p's term, and its copy is newer,
// whole and not stale.
func (p Peer) YieldsTo(m Machine) bool {
	return p.State.Serving() && p.Shared && p.Epoch < m.Epoch && (m.State == Wait || m.State == Stop) && (!m.Stale || m.StaleHeld) && !m.HandedOver && m.Resyncing == ""
}

// peerReady: the peer holds our data and can take over at once.
func (m Machine) peerReady() bool {
	return m.Peer.Seen && m.Peer.State == Second && m.Peer.Epoch == m.Epoch
}

func (m Machine) stepWait(ev Event) (Machine, []Action) {
	p := m.Peer
	var acts []Action
	switch ev.Kind {
	case EvPeer:
		m.Checking = false
		if p.State.Serving() {
			if p.YieldsTo(m) {
				// The peer serves on in a term older than this copy's,
				// one it carried on after losing this node: it steps
				// down on hearing that this copy is newer and not stale
				// (stepServing), which this node must not say otherwise.
				return m, nil
			}
			// From here on the serving peer writes what this copy lacks.
			if !m.Stale || m.StaleHeld || m.HandedOver {
				m.Stale, m.StaleHeld, m.HandedOver = true, false, false
				acts = append(acts, Action{Do: DoPersist})
			}
			// Not to an ALONE peer: it releases durability calls
			// without this copy, which may lack them however its
			// stream goes (it does not hear us).
			if p.Synced && p.State == Prim && m.Resyncing == "" {
				m.Epoch = p.Epoch
				m.Stale, m.StaleHeld = false, false
				m, more := m.to(Second, fmt.Sprintf("in sync with %s (epoch %d)", p.Name, p.Epoch))
				return m, append(acts, more...)
			}
			return m, acts
		}
		if m.StaleHeld && p.State == Wait && p.Stale && !p.StaleHeld && p.Epoch < m.Epoch && !m.HandedOver && m.Resyncing == "" {
			// Whoever held the role when this node's check found it
			// held, the peer does not serve now, counts its older copy
			// stale, and so defers to this one: a primary that stepped
			// down for this copy (Machine.Shared) and held the VIP
			// while it did. The next heartbeat decides as between any
			// two WAIT nodes.
			m.Stale, m.StaleHeld = false, false
			return m, []Action{{Do: DoPersist}, logf("peer %s gave up the role this node's check found held, and counts its copy (epoch %d) stale: this copy (epoch %d) is not stale", p.Label(), p.Epoch, m.Epoch)}
		}
		if (!p.Stale || p.StaleHeld) && p.Epoch > m.Epoch && (!m.Stale || m.StaleHeld) {
			// The peer's copy is newer: it served a term after this
			// copy's (a term draws a newer epoch), and is not serving
			// now (stopped, or back before serving again). Stale, and
			// saved: lost again, it must not be served over
			// (TestStoppedNewerPeerLostNotServedOver, from a review).
			m.Stale, m.StaleHeld = true, false
			acts = append(acts, Action{Do: DoPersist}, logf("peer %s holds a newer copy (epoch %d, here %d): this copy counts as stale", p.Label(), p.Epoch, m.Epoch))
		}
		if m.HandedOver && !m.Stale && p.Epoch <= m.Epoch && m.Resyncing == "" && (p.State == Wait && m.wins() || p.State == Stop) {
			// The node this one handed the role to is WAIT or STOP and
			// drew no newer epoch: it never served (a takeover draws
			// one). It restarted before taking over (its copy then
			// counts as stale and it will never serve), refused the
			// handover, or was stopped by the operator before it came
			// (`duet stop` on it during the swap: it serves nothing
			// until started, and waited for, nothing served:
			// TestSwapTargetStoppedGiverServesAgain, from a review);
			// either way this copy is still the reference, and, as it
			// wins or the peer is stopped, the peer will not serve.
			return m.serveFromWait(fmt.Sprintf("peer %s, handed the role, is %s and never served (epoch %d)", p.Name, p.State, p.Epoch))
		}
		if m.HandedOver || p.State == Stop && m.Stale {
			return m, acts
		}
		if p.State == Second {
			// A SECOND next to a node that does not serve either turns
			// WAIT or serves on hearing it (stepSecond), unless it is
			// a handover's receiver taking the role, which says SECOND
			// until the VIP and the capture are held (takeHandover):
			// winning over it would serve beside it (a giver that lost
			// it meanwhile and took back nothing: a review,
			// TestGiverLostReceiverInWindowThenHearsSecondServes). The
			// next heartbeat decides.
			return m, acts
		}
		// A stopped peer serves nothing: this copy serves, unless the
		// stopped one is newer (then this copy is stale, above).
		if p.State == Stop || m.wins() {
			m, more := m.serveFromWait(fmt.Sprintf("peer %s is %s and this copy is the reference", p.Name, p.State))
			return m, append(acts, more...)
		}
		return m, acts
	case EvPeerLost, EvTick:
		if !p.Seen && !m.Stale && !m.HandedOver && !m.Checking {
			// A peer last heard SECOND takes over by itself when it
			// loses this node, and nobody holds the VIP while neither
			// serves: this node's checks run a cluster.timeout later
			// (Grace), when a peer that took over holds it, and the
			// probe sees it. The case: a swap whose handover heartbeats
			// a cut lost; the giver took the role back at the moment
			// the receiver took over, both probes found the address
			// free, both served ALONE, and on meeting the one with the
			// older epoch lost what it acknowledged (a review:
			// TestSwapCutBothTakeOver; a second found the grace lost
			// after one stray heartbeat when only the takeback had it,
			// TestSwapCutFlapLosesGrace).
			m.Checking = true
			return m, []Action{{Do: DoCheck, Grace: p.State == Second}}
		}
		return m, nil
	case EvChecked:
		m.Checking = false
		if p.Seen || m.Stale || m.HandedOver {
			return m, nil // the peer came back meanwhile: heartbeats decide
		}
		if !ev.OK && ev.Held {
			// Not checked again until the peer is heard: a later probe
			// that the holder misses (its host stalled) would let this
			// copy serve beside it (TestWaitNotStaleRetriesAfterVIPAnswered).
			m.Stale, m.StaleHeld = true, true
			return m, []Action{{Do: DoPersist}, logf("not taking over: %s; this copy counts as stale (the role is held elsewhere)", ev.Why)}
		}
		if !ev.OK {
			return m, []Action{logf("not taking over: %s", ev.Why)}
		}
		return m.serveFromWait("peer not seen, checks passed")
	case EvCmdPrim:
		if p.Seen && p.State.Serving() {
			return m, []Action{refuse("peer %s is %s: never two primaries (use `duet swap` on it)", p.Name, p.State)}
		}
		if p.Seen && p.State == Second {
			// Taking the role over (a handover's receiver says SECOND
			// until it holds the VIP: takeHandover), or about to follow
			// this node or serve itself: never two primaries, whatever
			// the force (a review,
			// TestForcedPrimOnGiverDuringReceiverWindowRefused).
			return m, []Action{refuse("peer %s is SECOND: it is taking the role over or about to settle who serves; see `duet status` in a moment "+
				"(if it stays SECOND, its daemon is stuck: stop or restart it there, and this node takes over once it is lost)", p.Name)}
		}
		if m.Resyncing != "" && !ev.Force {
			return m, []Action{refuse("directory %s: this copy is mid-resync (inconsistent): not taking over; `duet prim --force` serves it half-written", m.Resyncing)}
		}
		if m.Stale && !ev.Force {
			return m, []Action{refuse("this copy (epoch %d) may be older than %s's: `duet prim --force` makes it the reference, and changes %s made after it are lost", m.Epoch, p.Label(), p.Label())}
		}
		if m.HandedOver && !ev.Force {
			return m, []Action{refuse("this node handed the primary role to %s, which may have served since: `duet prim --force` makes this copy (epoch %d) the reference, and changes %s made after the handover are lost", p.Label(), m.Epoch, p.Label())}
		}
		why := "forced by the operator"
		switch {
		case m.Resyncing != "":
			why = fmt.Sprintf("forced by the operator on a copy mid-resync: directory %s is half-written", m.Resyncing)
		case m.Stale, m.HandedOver:
			why = fmt.Sprintf("forced by the operator on a copy that may be stale (epoch %d): changes only %s had are lost", m.Epoch, p.Label())
		}
		return m.serveFromWait(why)
	case EvCmdSecond:
		return m, nil
	case EvCmdSwap:
		return m, []Action{refuse("this node is %s: run swap where the primary is, or wait until in sync", m.State)}
	}
	return m, nil
}

// serveFromWait serves from WAIT. A peer last heard at this copy's epoch,
// not stale and not serving may be a handover's receiver whose serve
// failed (its undo restored it not stale, as the SECOND it was): its
// term was never published (takeHandover), and should its undo not have
// been saved, its disk says PRIM at nextEpoch(2) from this epoch. This
// term draws beyond it, as the takeback of a lost receiver does (step):
// an epoch of the same counter and a higher node ID would make the
// receiver's unserved copy the newer one when both restart (reviews:
// TestTakebackEpochBeyondReceiversFailedTerm,
// TestGiverLostReceiverInWindowTakebackBeyondFailedTerm). Only there: a
// handover needs equal epochs.
func (m Machine) serveFromWait(why string) (Machine, []Action) {
	if m.Peer.Epoch == m.Epoch && !m.Peer.Stale {
		m.Peer.Epoch = m.nextEpoch(2)
	}
	return m.serve(why)
}

// Label is the peer's name for messages ("the peer" when unknown).
func (p Peer) Label() string {
	if p.Name == "" {
		return "the peer"
	}
	return p.Name
}

func (m Machine) stepSecond(ev Event) (Machine, []Action) {
	p := m.Peer
	switch ev.Kind {
	case EvPeer:
		m.Checking = false
		if p.Handover && !p.State.Serving() {
			if m.Stale {
				return m.to(Wait, fmt.Sprintf("handover from %s refused: this copy counts as stale", p.Name))
			}
			if p.Epoch != m.Epoch {
				return m.to(Wait, fmt.Sprintf("handover refused: epoch %d here, %d on %s", m.Epoch, p.Epoch, p.Name))
			}
			return m.takeHandover("handed over by " + p.Name)
		}
		if p.State.Serving() {
			if !p.Synced || p.Epoch != m.Epoch || p.State == Alone {
				// Stale at once, and said so in the next heartbeat: the
				// primary releases the durability calls it could not
				// ship only once this copy cannot take over.
				m.Stale = true
				return m.to(Wait, fmt.Sprintf("%s resynchronises this copy", p.Name))
			}
			return m, nil
		}
		if m.wins() {
			return m.serve(fmt.Sprintf("peer %s is %s and this copy is the reference", p.Name, p.State))
		}
		// As in stepWait: a peer with a newer copy served a term after
		// this copy's; lost before it serves again, it must not be
		// served over (TestSecondHearsNewerPeerThenLost, from a review).
		m.Stale = m.Stale || !p.Stale && p.Epoch > m.Epoch
		return m.to(Wait, fmt.Sprintf("peer %s is %s and its copy is the reference", p.Name, p.State))
	case EvPeerLost, EvTick:
		if !p.Seen && !m.Checking {
			m.Checking = true
			return m, []Action{logf("peer lost: checking before taking over"), {Do: DoCheck}}
		}
		return m, nil
	case EvChecked:
		m.Checking = false
		if p.Seen {
			return m, nil
		}
		if !ev.OK {
			// The old primary may still be serving: from now on it may
			// write what this copy lacks.
			m.Stale = true
			m, acts := m.to(Wait, "not taking over: "+ev.Why)
			return m, acts
		}
		return m.serve("peer lost, checks passed")
	case EvCmdPrim:
		return m, []Action{refuse("peer %s is the primary: use `duet swap` to move the role here", p.Label())}
	case EvCmdSwap:
		return m, []Action{refuse("run swap on the primary %s", p.Label())}
	}
	return m, nil
}

func (m Machine) stepServing(ev Event) (Machine, []Action) {
	p := m.Peer
	switch ev.Kind {
	case EvPeer:
		if p.State.Serving() {
			// Two primaries met (a healed partition, or a takeover this
			// node did not notice): one steps down, the same one on
			// both sides. The older epoch does, at once: the newer one
			// was drawn by a takeover, whose clients have moved on.
			// Epochs are unique to the node that drew them; equal ones
			// (from a peer of an older version) fall back to
			// splitWinner.
			m.Checking = false
			if p.Epoch < m.Epoch || p.Epoch == m.Epoch && m.splitWinner() {
				return m, []Action{logf("split brain: peer %s is %s too (epoch %d, here %d); it steps down, this copy stays the reference", p.Name, p.State, p.Epoch, m.Epoch)}
			}
			m.Stale = true
			return m.unserve(Wait, fmt.Sprintf("split brain: peer %s is %s too (epoch %d, here %d) and wins; changes made here since epoch %d will be replaced by its copy", p.Name, p.State, p.Epoch, m.Epoch, m.Epoch))
		}
		if p.Epoch == m.Epoch {
			m.Shared = true // not saved: a restart leaves the role
		}
		if m.Shared && p.Yields && (p.State == Wait || p.State == Stop) && (!p.Stale || p.StaleHeld) && !p.Handover && p.Epoch > m.Epoch {
			// The peer's copy is newer and it does not count it stale:
			// having known this term, it drew its epoch in a takeover
			// since, and served, while this node was not heard (its
			// host stalled, or a cut hid it and the VIP). It serves no
			// more (its daemon restarted, or it left the role), but
			// what it acknowledged is newer than what this node wrote
			// alone since: had the peer been serving still, the newer
			// epoch would win (above); the restart in between must not
			// decide the other way. A PRIM that had not lost it yet
			// released nothing the peer lacked.
			m.Stale = true
			return m.unserve(Wait, fmt.Sprintf("peer %s holds a newer copy (epoch %d, here %d, not stale): it took the role over while this node could not be heard, and served; "+
				"this copy steps down, and what it acknowledged alone since then is replaced by the peer's", p.Name, p.Epoch, m.Epoch))
		}
		if m.State == Alone {
			m.State = Prim
			return m, []Action{{Do: DoPersist}, logf("ALONE -> PRIM: peer %s is back (%s), resynchronising it", p.Name, p.State)}
		}
		if m.ServiceDown != "" && m.peerReady() && !p.ServiceFailed {
			// A service failed here while no peer could take the role;
			// now one can.
			why := m.ServiceDown
			m.HandedOver, m.ServiceFailed = true, true
			return m.unserve(Wait, fmt.Sprintf("service failed (%s) while no peer could take the role; %s can now: failing over to it", why, p.Name))
		}
		return m, nil
	case EvPeerLost:
		if m.State == Prim {
			m.State = Alone
			m.Epoch = m.nextEpoch(1)
			return m, []Action{{Do: DoPersist}, logf("PRIM -> ALONE (epoch %d): peer lost, changes are tracked for its return", m.Epoch)}
		}
		return m, nil
	case EvIsolated:
		if p.Seen {
			return m, nil
		}
		return m.unserve(Wait, "isolated: neither the peer nor the witness answers")
	case EvCmdSwap, EvCmdSecond:
		if !m.peerReady() {
			return m, []Action{refuse("peer %s is not in sync (%s): a swap now would lose data", p.Label(), peerStateWord(p))}
		}
		m.HandedOver = true
		return m.unserve(Wait, "swap: handing over to "+p.Name)
	case EvServiceDown, EvDiskFailed:
		what := "service failed"
		if ev.Kind == EvDiskFailed {
			what = "disk failed"
		}
		if ev.Kind == EvServiceDown && (!m.peerReady() || p.ServiceFailed) {
			// Kept: moved once a peer can take it (EvPeer, above).
			m.ServiceDown = ev.Why
		}
		if !m.peerReady() {
			return m, []Action{logf("%s (%s) and no peer in sync to fail over to: keeping the role", what, ev.Why)}
		}
		if ev.Kind == EvServiceDown && p.ServiceFailed {
			return m, []Action{logf("%s (%s), and a service failed on %s before it handed the role here: keeping the role (mend the service, then `duet swap` if it is to move)", what, ev.Why, p.Name)}
		}
		m.HandedOver = true
		m.ServiceFailed = ev.Kind == EvServiceDown
		return m.unserve(Wait, fmt.Sprintf("%s (%s): failing over to %s", what, ev.Why, p.Name))
	case EvServeFailed:
		u := m.undo
		m.undo = prior{}
		if !u.set {
			return m.unserve(Stop, ev.Why+"; fix it, then run `duet start`")
		}
		// A handover's term that never began: the daemon publishes
		// its serving state only once the VIP and the capture are
		// taken (Action.Unpublished), so the giver never heard it
		// serve and no durability call was answered in it (a node
		// that does not say it serves refuses them). The copy is what
		// it was before, at the epoch it had: kept at the new one, it
		// would count as newer than the peer's though it holds nothing
		// more, and the peer that handed the role here would count its
		// own copy stale on hearing it and never serve again
		// (TestHandoverReceiverServeFailedGiverServes). Stopped at the
		// old one, a giver takes the role back at once (stepWait: a
		// peer handed the role is STOP and never served).
		failed := m.Epoch
		m.Epoch, m.Stale, m.StaleHeld, m.HandedOver, m.ServiceFailed = u.epoch, u.stale, u.staleHeld, u.handedOver, u.serviceFailed
		return m.unserve(Stop, fmt.Sprintf("%s; the term (epoch %d) never began: the copy stays at epoch %d; fix it, then run `duet start`", ev.Why, failed, m.Epoch))
	case EvCmdPrim:
		return m, []Action{refuse("already %s", m.State)}
	}
	return m, nil
}

func peerStateWord(p Peer) string {
	if !p.Seen {
		return "not seen"
	}
	return p.State.String()
}

// splitWinner picks the serving node that stays when two meet: the
// preferred one, else the smaller name. Both sides compute the same.
func (m Machine) splitWinner() bool {
	if m.Preferred != m.Peer.Preferred {
		return m.Preferred
	}
	return m.Name < m.Peer.Name
}
