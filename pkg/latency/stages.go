package latency

import "time"

// Stage is one step of a durability call, in the order a call meets them.
type Stage int

// The stages. A call's time is not their sum: the local flush runs beside
// the barrier, and the peer's apply and flush are parts of Peer.
const (
	// Held: the supervisor held the call, from the seccomp notification
	// to its answer (the whole call but the trap and the resumption).
	Held Stage = iota
	// LocalFlush: the caller's own fsync/fdatasync, which the supervisor
	// runs beside the barrier on a duplicate of its descriptor.
	LocalFlush
	// ControlHop: the round trip on the control socket (`duet exec`'s
	// supervisor to the daemon and back) beyond the daemon's own time.
	ControlHop
	// Daemon: the daemon's answer to a barrier request, whole.
	Daemon
	// Drain: reading the capture ring up to the call.
	Drain
	// Build: from the drain to the build pass that took every change
	// captured before the call.
	Build
	// Peer: from that pass to the peer's durable ack of its last batch
	// (send, network, apply, flush, ack).
	Peer
	// SyncRTT: from a sync request sent to its durable ack (primary).
	SyncRTT
	// Apply: applying one batch (secondary).
	Apply
	// Flush: flushing what the batches touched, for a sync request
	// (secondary).
	Flush
	numStages
)

var stageNames = [numStages]string{"held", "local_flush", "control_hop", "daemon", "drain", "build", "peer", "sync_rtt", "apply", "flush"}

func (s Stage) String() string { return stageNames[s] }

// Stages holds one histogram per stage; its zero value is ready, and a
// nil *Stages records nothing.
type Stages struct {
	h [numStages]Histogram
}

// Observe counts d for stage s.
func (t *Stages) Observe(s Stage, d time.Duration) {
	if t != nil {
		t.h[s].Observe(d)
	}
}

// Since counts the time since start for stage s.
func (t *Stages) Since(s Stage, start time.Time) { t.Observe(s, time.Since(start)) }

// Snapshot returns every stage that counted something, in stage order.
func (t *Stages) Snapshot() []StageCounts {
	var out []StageCounts
	for s := range numStages {
		c := t.h[s].Snapshot()
		if c.Total() > 0 {
			out = append(out, StageCounts{Stage: s.String(), Counts: c})
		}
	}
	return out
}

// StageCounts is one stage's histogram in a snapshot.
type StageCounts struct {
	Stage  string `json:"stage"`
	Counts Counts `json:"counts"`
}
