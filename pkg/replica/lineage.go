package replica

import (
	"time"

	"github.com/duet-ha/duet/pkg/wire"
)

// lineage is which copy of the directory the peer holds, relative to
// this one, and what the modification bitmap is worth for it: what a
// resync's plan is made of. Set by BeginTerm from the copy's Meta, moved
// on by a resync's end (caughtUp). Called with Primary.mu held.
type lineage struct {
	gen  uint64 // this term's generation
	base uint64 // the generation the peer's copy follows, as far as this node knows (0: unknown)
	// trusted: the bitmap holds every change the peer's copy of base
	// lacks (saved at a clean stop, or kept since the peer followed).
	trusted  bool
	selfSync int64 // this copy's sync point when the term began (unix ns)
	// untracked is a trusted bitmap's save time: the changes made since,
	// while duet was stopped, were not captured (0: none).
	untracked int64
}

// clockStepped moves the lineage's wall-clock times back by d (see
// MetaStore.ClockStepped).
func (l *lineage) clockStepped(d time.Duration) {
	l.selfSync = StepBack(l.selfSync, d)
	l.untracked = StepBack(l.untracked, d)
}

// follows reports whether the peer's copy follows this term's
// generation: a resync of this term ended.
func (l lineage) follows() bool { return l.base == l.gen && l.base != 0 }

// caughtUp records that the peer confirmed a resync of this term: its
// copy follows this generation, and the bitmap holds every change it
// lacks from then on.
func (l *lineage) caughtUp() {
	l.base, l.trusted, l.untracked = l.gen, true, 0
}

// plan decides the resync for a peer that welcomed this node with w:
// what this copy's lineage and the peer's state call for, or (forceAll)
// a comparison of every file. The margin m (DefaultMargin if not positive) is
// taken off every cutoff: the clocks of the two nodes differ, and a
// change is stamped a little before it is captured.
func (l lineage) plan(w wire.Welcome, forceAll bool, m time.Duration) resyncPlan {
	margin := m.Nanoseconds()
	if margin <= 0 {
		margin = DefaultMargin.Nanoseconds()
	}
	var pl resyncPlan
	pl.all = forceAll || l.base == 0 || w.Gen != l.base
	pl.useDirty = l.trusted
	if !l.trusted {
		if l.selfSync == 0 {
			pl.all = true
		}
		pl.cutoffS = l.selfSync - margin
	}
	if c := l.untracked - margin; l.untracked != 0 && (pl.cutoffS == 0 || c < pl.cutoffS) {
		pl.cutoffS = c
	}
	if w.State&wire.CopyDiverged != 0 {
		if w.SyncTime == 0 {
			pl.all = true
		} else {
			pl.cutoffT = w.SyncTime - margin
			if w.State&wire.CopySource != 0 {
				// The peer was the source: what it had, this node
				// got before its own term and may hold where the
				// peer lost it (a crash loses its page cache).
				if c := w.SyncTime - margin; pl.cutoffS == 0 || c < pl.cutoffS {
					pl.cutoffS = c
				}
			}
		}
		pl.report = w.State&wire.CopySource != 0
	}
	switch {
	case pl.all:
		pl.mode, pl.useDirty, pl.cutoffS = "full", false, 0
	case pl.useDirty && pl.cutoffS == 0 && pl.cutoffT == 0:
		pl.mode = "bitmap"
	case pl.useDirty:
		pl.mode = "bitmap+recent"
	default:
		pl.mode = "recent"
	}
	return pl
}
