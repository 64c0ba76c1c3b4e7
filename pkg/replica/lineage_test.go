package replica

import (
	"testing"
	"time"

	"github.com/duet-ha/duet/pkg/wire"
)

// A crashed source's lineage: its peer holds the old generation, the
// bitmap is lost, the changes since the sync point are compared. Once a
// resync of this term ends, the peer follows it and the next resync
// needs the bitmap alone.
func TestLineageCaughtUp(t *testing.T) {
	now := time.Now().UnixNano()
	l := lineage{gen: 20, base: 10, selfSync: now, untracked: now - int64(time.Hour)}
	if l.follows() {
		t.Fatal("a peer of the last generation follows this term's")
	}
	pl := l.plan(wire.Welcome{Gen: 10, State: wire.CopyConsistent}, false, time.Second)
	if pl.mode != "recent" || pl.cutoffS != now-int64(time.Hour)-int64(time.Second) {
		t.Errorf("before: %+v, want the files changed since the untracked window compared", pl)
	}
	l.caughtUp()
	if !l.follows() || !l.trusted || l.untracked != 0 {
		t.Fatalf("after a resync of this term: %+v", l)
	}
	pl = l.plan(wire.Welcome{Gen: 20, State: wire.CopyConsistent}, false, time.Second)
	if pl.mode != "bitmap" || pl.cutoffS != 0 {
		t.Errorf("after: %+v, want the bitmap alone", pl)
	}
	if pl := l.plan(wire.Welcome{Gen: 20, State: wire.CopyConsistent}, true, time.Second); pl.mode != "full" {
		t.Errorf("forced: %+v, want every file compared", pl)
	}
	if (lineage{}).follows() {
		t.Error("an unknown lineage (generation 0) follows")
	}
}

// TestClockSteppedWidensTheWindow: a lineage whose clock was set back by d
// compares from d earlier (its own sync point and untracked window).
func TestClockSteppedWidensTheWindow(t *testing.T) {
	sync := time.Now().UnixNano()
	l := lineage{gen: 2, base: 1, selfSync: sync, untracked: sync - int64(time.Hour)}
	before := l.plan(wire.Welcome{Gen: 1}, false, DefaultMargin)
	l.clockStepped(10 * time.Minute)
	after := l.plan(wire.Welcome{Gen: 1}, false, DefaultMargin)
	if got := time.Duration(before.cutoffS - after.cutoffS); got != 10*time.Minute {
		t.Errorf("the window starts %s earlier, want 10m", got)
	}
	if l.selfSync != sync-int64(10*time.Minute) || l.untracked != sync-int64(time.Hour+10*time.Minute) {
		t.Errorf("lineage times not moved back: %+v", l)
	}
	l = lineage{selfSync: 5}
	l.clockStepped(time.Hour)
	if l.selfSync != 1 {
		t.Errorf("a sync point moved back past 1970 is %d, want 1 (0 says none)", l.selfSync)
	}
}

// TestClockSteppedMovesPassMarks: a pass taken before the clock was set
// back, made durable after, set the sync point in the old reckoning, up
// to the step ahead of the changes made since (from a review): its time
// moves back with the step.
func TestClockSteppedMovesPassMarks(t *testing.T) {
	at := time.Now()
	var m durableMarks
	m.addPass(passMark{mark: 1, seq: 1, at: at})
	m.newest = passMark{mark: 0, seq: 0, at: at.Add(-time.Second)}
	m.clockStepped(2 * time.Minute)
	if got := at.Sub(m.passes[0].at); got != 2*time.Minute {
		t.Errorf("pending pass moved back by %s, want 2m", got)
	}
	if got := at.Add(-time.Second).Sub(m.newest.at); got != 2*time.Minute {
		t.Errorf("newest durable pass moved back by %s, want 2m", got)
	}
	m.clockStepped(time.Duration(1<<63 - 1))
	if m.passes[0].at.UnixNano() != 1 {
		t.Errorf("a step of unknown size leaves the pass at %v, want the earliest (1 ns)", m.passes[0].at)
	}
}

// TestInReckoningFollowsMonotonic: a time read before the clock was set
// back comes out in the clock's new reckoning (from its monotonic
// reading); here, with no step, it is the time itself.
func TestInReckoningFollowsMonotonic(t *testing.T) {
	at := time.Now()
	time.Sleep(10 * time.Millisecond)
	if d := inReckoning(at) - at.UnixNano(); d < -int64(time.Millisecond) || d > int64(time.Millisecond) {
		t.Errorf("with no step, inReckoning is %d ns off the time's own", d)
	}
	stripped := at.Round(0) // no monotonic reading: taken as it is
	if d := inReckoning(stripped) - stripped.UnixNano(); d < -int64(time.Millisecond) || d > int64(time.Millisecond) {
		t.Errorf("a time without a monotonic reading: %d ns off", d)
	}
}
