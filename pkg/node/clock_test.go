package node

import (
	"context"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/duet-ha/duet/pkg/replica"
)

// TestWatchClockSeesBackwardStep: a backward step of the wall clock
// against the monotonic one is reported with its size; forward steps and
// small backward ones (NTP's slewing, within the margin) are not.
func TestWatchClockSeesBackwardStep(t *testing.T) {
	s := int64(time.Second)
	readings := []clockReading{
		{1000 * s, 10 * s},         // start
		{1001 * s, 11 * s},         // steady
		{941 * s, 12 * s},          // set back by 61 s
		{2000 * s, 13 * s},         // set forward
		{2000*s + s/2, 14 * s},     // 0.5 s back: ignored
		{2001*s - 2*s, 15 * s},     // 3 s back from the high mark
		{2001*s - 2*s + s, 16 * s}, // steady
	}
	i := 1
	read := func() (clockReading, bool) { r := readings[i]; i++; return r, true }
	tick := make(chan time.Time)
	var steps []time.Duration
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		watchClock(ctx, tick, readings[0], read, func(d time.Duration) { steps = append(steps, d) })
	}()
	for range len(readings) - 1 {
		tick <- time.Now()
	}
	cancel()
	<-done
	want := []time.Duration{61 * time.Second, 3 * time.Second}
	if len(steps) != len(want) || steps[0] != want[0] || steps[1] != want[1] {
		t.Errorf("steps reported %v, want %v", steps, want)
	}
}

// TestClockSteppedMovesSyncPointsBack: after the wall clock was set back
// by d, every copy's sync point, untracked window and saved bitmap's time
// are d earlier. Without it, a resync after a crash compared only the
// files whose ctime is past the sync point less the margin, and missed
// those changed after the step (their ctimes up to d earlier).
func TestClockSteppedMovesSyncPointsBack(t *testing.T) {
	n, ms, state := nodeWithCopy(t)
	sync := time.Now().Add(5 * time.Minute) // recorded before the clock went back
	ms.Update(func(m *replica.Meta) { m.SyncTime, m.Untracked = sync.UnixNano(), sync.Add(-time.Hour).UnixNano() })
	bm := filepath.Join(state, "bitmap-data")
	if err := os.WriteFile(bm, []byte("x"), 0o600); err != nil {
		t.Fatal(err)
	}
	os.Chtimes(bm, time.Time{}, sync)
	back := n.clockSetBackWhileStopped()
	if back < 5*time.Minute-time.Second || back > 5*time.Minute {
		t.Fatalf("a sync point 5 min ahead of the clock: set back by %s found, want about 5m", back)
	}
	n.clockStepped(back)
	m := ms.Get()
	if got := time.Duration(sync.UnixNano() - m.SyncTime); got != back {
		t.Errorf("sync point moved back by %s, want %s", got, back)
	}
	if got := time.Duration(sync.Add(-time.Hour).UnixNano() - m.Untracked); got != back {
		t.Errorf("untracked window moved back by %s, want %s", got, back)
	}
	fi, _ := os.Stat(bm)
	if got := sync.Sub(fi.ModTime()); got != back {
		t.Errorf("saved bitmap's time moved back by %s, want %s", got, back)
	}
	if after := n.clockSetBackWhileStopped(); after > 0 {
		t.Errorf("after the move a time is still %s ahead of the clock", after)
	}
}

// TestClockSetBackWhileStoppedWidensToAll: a recorded time ahead of the
// clock at start says the clock was set back while duet was stopped, by
// that much plus the time stopped, which is not known: moving back by the
// time ahead alone left out the changes made while stopped after the
// step (from a review). Every window starts at the earliest.
func TestClockSetBackWhileStoppedWidensToAll(t *testing.T) {
	n, ms, _ := nodeWithCopy(t)
	ahead := time.Now().Add(time.Minute)
	ms.Update(func(m *replica.Meta) { m.SyncTime, m.Untracked = ahead.UnixNano(), ahead.UnixNano() })
	n.checkClockAtStart()
	if m := ms.Get(); m.SyncTime != 1 || m.Untracked != 1 {
		t.Errorf("sync point %d, untracked %d after the start check: want 1 and 1 (the earliest)", m.SyncTime, m.Untracked)
	}
	// Not ahead: nothing moves.
	ms.Update(func(m *replica.Meta) { m.SyncTime, m.Untracked = time.Now().UnixNano(), 0 })
	before := ms.Get()
	n.checkClockAtStart()
	if m := ms.Get(); m.SyncTime != before.SyncTime || m.Untracked != 0 {
		t.Errorf("a clock not set back moved the sync point: %+v, was %+v", m, before)
	}
}

// nodeWithCopy is a test node with one replicated directory, "data", and
// its copy's metadata; it returns the node, the metadata and the state_dir.
func nodeWithCopy(t *testing.T) (*Node, *replica.MetaStore, string) {
	state := t.TempDir()
	n := testNode(t, state)
	n.dirs = []replica.Dir{{Name: "data", Path: t.TempDir()}}
	ms, err := replica.OpenMeta(state, "data")
	if err != nil {
		t.Fatal(err)
	}
	n.metas = []*replica.MetaStore{ms}
	return n, ms, state
}
