package cluster

import "time"

// MaxClockDrift bounds how much faster or slower the peer's clock may run
// than ours, as a fraction: 1000 ppm. The clocks are raw monotonic ones
// (CLOCK_MONOTONIC_RAW), which NTP does not slew: they differ by their
// crystals' error, tens of ppm. (Slewed clocks may differ by 8 % while
// chrony corrects a large offset.)
const MaxClockDrift = 1000 // parts per million

// Guard decides which of the peer's heartbeats show that the peer is alive
// now, and stamps this node's own heartbeats. One Guard serves one daemon
// run; its owner serialises the calls.
//
// A MAC proves that the peer sent a heartbeat, not when: a recorded
// heartbeat replayed after the peer died would make it look alive (no
// failover), and an old PRIM+preferred one would make a primary step down.
// Wall clocks cannot say when either: two edge nodes' clocks may differ by
// minutes. So the age of a heartbeat is measured on the receiver's own
// clock, by challenge and response:
//
//   - Every heartbeat carries this run's random Boot and the sender's clock
//     reading (Time), and echoes the Boot and Time of a heartbeat it heard
//     from the peer. A heartbeat echoing our Boot and a Time t of ours was
//     made after t: at now, it is at most now−t old. A recording made
//     before this run echoes another Boot; one made earlier in this run
//     echoes an old t. Neither clocks nor state on disk are needed, and a
//     restarted receiver (a new Boot) cannot be fooled by anything
//     recorded before.
//   - Such a heartbeat also anchors the peer's clock to ours: our clock
//     minus the peer's was at least t − its Time. Later heartbeats of the
//     same peer Boot are aged through that anchor even when their echo is
//     old, which it is whenever our heartbeats stop reaching the peer (a
//     link lost one way): the peer still hears nothing, we still hear it
//     alive and, above all, hear it announce ALONE, which marks our copy
//     stale. The two clocks drift apart by up to MaxClockDrift of the time
//     since the anchor's t, and the age allowed grows by as much, up to a
//     quarter of maxAge (reached after 5 minutes at the default timeout;
//     real clocks drift by tens of ppm, a few ms in an hour).
//   - A heartbeat is accepted when it is at most maxAge old (the peer-lost
//     timeout: older, it would not have kept the peer alive anyway) and,
//     within the peer's Boot, its Seq is higher than any accepted: a copy
//     from another network, a late one, or one held back and replayed
//     within maxAge counts at most once, in order.
//
// The echo: until a heartbeat of the peer has been accepted, the last one
// heard (a peer that just started cannot prove anything yet, and we must
// give it our challenge); after that, the last accepted one whose state
// this node has applied (Applied), so that a replayed heartbeat cannot
// make this node echo a stale challenge, and an echo tells the peer which
// of its heartbeats the state we report took into account. A
// restart of either side is accepted within about two intervals: the new
// run's second heartbeat echoes the other's challenge, and the other then
// echoes the new run.
type Guard struct {
	boot   uint64
	maxAge time.Duration
	seq    uint64 // of our last heartbeat

	peer    uint64        // the peer's Boot accepted last; 0: none yet
	peerSeq uint64        // its highest Seq accepted
	offset  time.Duration // our clock minus the peer's is at least this,
	anchor  time.Duration // ... as of this time of ours (an echoed Time)

	echoBoot uint64
	echoTime time.Duration
	accepted bool // echoBoot comes from an accepted heartbeat

	retired []uint64 // peer runs replaced by a newer one (retire)
}

// NewGuard returns the guard of a run whose heartbeats carry boot (random,
// not 0: 0 is "no echo") and which accepts heartbeats at most maxAge old.
func NewGuard(boot uint64, maxAge time.Duration) *Guard {
	return &Guard{boot: boot, maxAge: maxAge}
}

// Unanswered reports whether the peer cannot accept our heartbeats yet:
// h (authenticated) echoes no heartbeat of this run, or it is the first
// accepted of a new peer run, whose heartbeats echoed none of ours. One
// sent at once then spares a restarted node (or its peer) an interval or
// more of not being heard; the caller bounds how often it does that.
func (g *Guard) Unanswered(h *Heartbeat, accepted bool, peerBefore uint64) bool {
	return h.EchoBoot != g.boot || (accepted && g.peer != peerBefore)
}

// Peer is the peer's run accepted last (0: none yet).
func (g *Guard) Peer() uint64 { return g.peer }

// Stamp fills in h's Boot, Seq, Time (now) and echo before it is sent.
func (g *Guard) Stamp(h *Heartbeat, now time.Duration) {
	g.seq++
	h.Boot, h.Seq, h.Time = g.boot, g.seq, now
	h.EchoBoot, h.EchoTime = g.echoBoot, g.echoTime
}

// Accept reports whether h, authenticated and from the peer's address,
// shows the peer alive at now: made at most maxAge ago and newer than
// every heartbeat accepted before.
func (g *Guard) Accept(h *Heartbeat, now time.Duration) bool {
	if !g.accept(h, now) {
		if !g.accepted {
			g.echoBoot, g.echoTime = h.Boot, h.Time
		}
		return false
	}
	g.accepted = true
	return true
}

// Applied makes h, accepted before, the heartbeat this node echoes: its
// owner calls it once the state h carried has been applied, so that a
// heartbeat echoing h reports a state that took h into account (the peer
// relies on that before it releases a write without us: see
// node.peerCannotTakeOver). Until then the echo stays at the heartbeat
// applied before.
func (g *Guard) Applied(h *Heartbeat) {
	if h.Boot == g.peer && (g.echoBoot != h.Boot || h.Time > g.echoTime) {
		g.echoBoot, g.echoTime = h.Boot, h.Time
	}
}

// Boot is this run's boot id, which the peer's heartbeats echo.
func (g *Guard) Boot() uint64 { return g.boot }

func (g *Guard) accept(h *Heartbeat, now time.Duration) bool {
	if g.Retired(h.Boot) {
		return false
	}
	known := g.peer != 0 && h.Boot == g.peer
	if known && h.Seq <= g.peerSeq {
		return false
	}
	// Each anchor bounds h's age on its own: one that shows h young
	// enough is enough. A newer echo of ours is the closer anchor, and
	// the first one of a new peer Boot is the only way that Boot is
	// believed; but a newer echo may still be too old (the peer stopped
	// accepting ours while our clock stood still, suspended), and then
	// only the stored anchor can show the peer alive: refusing both
	// ways, the two nodes would never echo each other again.
	offset, anchor := g.offset, g.anchor
	fresh := known && g.young(h, now, offset, anchor)
	if h.EchoBoot == g.boot && h.EchoTime <= now && (!known || h.EchoTime > g.anchor) &&
		g.young(h, now, h.EchoTime-h.Time, h.EchoTime) {
		offset, anchor, fresh = h.EchoTime-h.Time, h.EchoTime, true
	}
	if !fresh {
		return false
	}
	if g.peer != 0 && g.peer != h.Boot {
		g.retire(g.peer)
	}
	g.peer, g.peerSeq, g.offset, g.anchor = h.Boot, h.Seq, offset, anchor
	return true
}

// maxRetired bounds the peer runs remembered as replaced.
const maxRetired = 8

// retire remembers that the peer's run boot was replaced by a newer one:
// its process is gone, and a heartbeat of it arriving now (held back in
// the network, or replayed while it still echoes a recent time of ours)
// must not bring back that run's state: a restarted primary's old run
// said "synced" at its old epoch.
func (g *Guard) retire(boot uint64) {
	if g.Retired(boot) {
		return
	}
	if len(g.retired) == maxRetired {
		g.retired = g.retired[1:]
	}
	g.retired = append(g.retired, boot)
}

// Retired reports whether the peer's run boot was replaced by a newer
// one.
func (g *Guard) Retired(boot uint64) bool {
	for _, b := range g.retired {
		if b == boot {
			return true
		}
	}
	return false
}

// young reports whether h was made at most maxAge ago, aged through the
// anchor (our clock minus the peer's at least offset, as of anchor): the
// clocks drift apart by up to MaxClockDrift since then, an allowance
// capped at maxDriftAllowance of maxAge.
func (g *Guard) young(h *Heartbeat, now, offset, anchor time.Duration) bool {
	since := now - anchor
	allow := min(since/1e6*MaxClockDrift, g.maxAge/maxDriftAllowance)
	return now-(offset+h.Time) <= g.maxAge+allow
}

// maxDriftAllowance caps the drift allowance at maxAge/4. Uncapped, it
// grew with the anchor's age without bound, and an attacker delaying
// every heartbeat by less than the timeout (so that no echo ever renewed
// the anchor) could, after 25 minutes, have a "synced" heartbeat held
// back 2.5 s accepted: past the 2 × timeout after which the primary
// releases a call without its stale peer (node.staleCurrent), which the
// held heartbeat then made SECOND, able to take over without the call's
// write (a review, fortieth session). Capped, an accepted heartbeat is at
// most 1.25 × maxAge old by the anchor's reckoning, and 2 × timeout
// leaves 0.75 × timeout for the clocks' real drift (tens of ppm: hours).
const maxDriftAllowance = 4
