package node

import (
	"context"
	"math"
	"os"
	"time"

	"github.com/duet-ha/duet/pkg/replica"
	"golang.org/x/sys/unix"
)

// clockStepMin is the smallest backward step of the wall clock that
// moves the sync points back (clockStepped). Smaller ones, and NTP's
// slewing, are within the resync's margin (30 s).
const clockStepMin = time.Second

// clockReading is the wall clock (unix ns) and a monotonic clock read
// together.
type clockReading struct{ wall, mono int64 }

// bootNanos reads CLOCK_BOOTTIME: the clock of the cluster loop's and the
// release rule's timers (the last heartbeat, the peer's loss, the
// witness's last answer, the VIP found free, the start wait). A wall-clock
// step moved them when they were wall-clock readings (a review, fortieth
// session): set back, a witness answer from before the step counted as
// "since the loss" and an isolated primary released calls the peer, taking
// over, lacked; a dead peer was not declared lost for the size of the
// step; set forward, a live peer was declared lost and a finite start_wait
// ended at once. BOOTTIME also runs across a suspend, as the peer's
// silence does.
func bootNanos() int64 {
	var ts unix.Timespec
	unix.ClockGettime(unix.CLOCK_BOOTTIME, &ts) // cannot fail on Linux ≥ 2.6.39
	return ts.Nano()
}

// bootSince is the time since a bootNanos reading; 0 (never) is long ago.
func bootSince(t int64) time.Duration {
	if t == 0 {
		return math.MaxInt64
	}
	return time.Duration(bootNanos() - t)
}

// readClocks reads both; false if CLOCK_BOOTTIME could not be read (a
// reading of 0 would look like a step of the whole uptime).
func readClocks() (clockReading, bool) {
	var ts unix.Timespec
	if err := unix.ClockGettime(unix.CLOCK_BOOTTIME, &ts); err != nil { // runs on across a suspend, as the wall clock does
		return clockReading{}, false
	}
	return clockReading{wall: time.Now().UnixNano(), mono: ts.Nano()}, true
}

// watchClock calls stepped with the size of every backward step of the
// wall clock against the monotonic one (clockStepMin or more), from the
// reading first (taken before the daemon's start check, so that a step
// in between is seen) and one at each tick, until ctx ends. Forward
// steps only widen the resyncs' windows: they are followed silently.
func watchClock(ctx context.Context, tick <-chan time.Time, first clockReading, read func() (clockReading, bool), stepped func(time.Duration)) {
	offset := first.wall - first.mono
	for {
		select {
		case <-ctx.Done():
			return
		case <-tick:
		}
		r, ok := read()
		if !ok {
			continue
		}
		o := r.wall - r.mono
		if back := time.Duration(offset - o); back >= clockStepMin {
			stepped(back)
			offset = o
		} else if o > offset {
			offset = o
		}
	}
}

// clockStepped moves every copy's sync point, and the lineage of every
// running term, back by d: the wall clock was set back by d, and the
// resyncs that compare the files changed since a sync point (by ctime)
// would miss those changed after the step (MetaStore.ClockStepped).
func (n *Node) clockStepped(d time.Duration) {
	n.log.Warn("the wall clock was set back: every sync point moves back as much, so that a resync compares the files changed since the step",
		"step", d.Round(time.Millisecond))
	for i, ms := range n.metas {
		if err := ms.ClockStepped(d); err != nil {
			n.log.Error("saving the sync point moved back after a clock step", "dir", n.dirs[i].Name, "err", err)
		}
		// A saved bitmap's time starts the window of the changes made
		// while duet was stopped.
		bm := n.bitmapPath(n.dirs[i].Name)
		if fi, err := os.Stat(bm); err == nil {
			if err := os.Chtimes(bm, time.Time{}, time.Unix(0, replica.StepBack(fi.ModTime().UnixNano(), d))); err != nil {
				n.log.Error("moving a saved bitmap's time back after a clock step", "bitmap", bm, "err", err)
			}
		}
	}
	n.smu.RLock()
	for _, p := range n.primaries {
		p.ClockStepped(d)
	}
	n.smu.RUnlock()
}

// clockSetBackWhileStopped returns how far the wall clock is behind the
// newest time a copy recorded (its sync point, the start of its untracked
// window, a saved bitmap's time); 0: not behind. Behind, it was set back
// while the daemon was stopped, by more than that (by that plus the time
// stopped): how far is not known (checkClockAtStart).
func (n *Node) clockSetBackWhileStopped() time.Duration {
	now := time.Now().UnixNano()
	var back int64
	for i, ms := range n.metas {
		m := ms.Get()
		times := []int64{m.SyncTime, m.Untracked}
		if fi, err := os.Stat(n.bitmapPath(n.dirs[i].Name)); err == nil {
			times = append(times, fi.ModTime().UnixNano())
		}
		for _, t := range times {
			back = max(back, t-now)
		}
	}
	return time.Duration(back)
}

// unknownStep moves a time back to the earliest (clockStepped): by how
// much the clock was set back is not known.
const unknownStep = time.Duration(1<<63 - 1)

// checkClockAtStart widens every copy's windows to the earliest time when
// a time they recorded is ahead of the clock: it was set back while the
// daemon was stopped, by an amount not known (the time ahead is that less
// the time stopped: moving back by it left the changes made while stopped
// after the step out of the window; from a review). The next resync that
// compares recent files compares them all.
func (n *Node) checkClockAtStart() {
	if ahead := n.clockSetBackWhileStopped(); ahead >= clockStepMin {
		n.log.Warn("a time this node recorded is ahead of the clock: it was set back while duet was stopped; the next resync compares every file",
			"ahead", ahead.Round(time.Millisecond))
		n.clockStepped(unknownStep)
	}
}
