package replica

import (
	"time"

	"github.com/duet-ha/duet/pkg/journal"
)

// passMark is a build pass that took every change counted up to mark,
// captured before at, in batches up to seq.
type passMark struct {
	mark, seq uint64
	at        time.Time
}

// fileMark: a resync shipped the bitmap's chunks of ino (those counted up
// to mark) in batches up to seq. Once the peer made them durable, they
// are forgotten: a resync cut short resumes with the files it had not
// finished.
type fileMark struct {
	ino, mark, seq uint64
}

// maxFileMarks bounds the files remembered until the peer syncs; beyond,
// they wait for a pass that ships everything it took.
const maxFileMarks = 1 << 16

// durableMarks is how a Primary's modification bitmap learns what it may
// forget: the passes that covered every change up to a count, and the
// files a pass or a resync shipped whole, each in batches up to a
// number. Once the peer made that batch durable, the bitmap forgets
// those changes (apply). It has no lock of its own: its methods are
// called with Primary.mu held.
type durableMarks struct {
	passes []passMark // covered passes not yet durable on the peer, in order
	files  []fileMark // files shipped whole, not yet durable on the peer
	// newest is the newest pass the peer made durable; the bitmap was
	// last cleared up to cleared, at lastClear.
	newest    passMark
	cleared   uint64
	lastClear time.Time
}

// clockStepped moves the passes' times back by d (the wall clock was set
// back by d): a pass taken before the step, made durable after, would
// otherwise set the sync point in the old reckoning (from a review).
func (m *durableMarks) clockStepped(d time.Duration) {
	back := func(t time.Time) time.Time { return time.Unix(0, StepBack(t.UnixNano(), d)) }
	for i := range m.passes {
		m.passes[i].at = back(m.passes[i].at)
	}
	if !m.newest.at.IsZero() {
		m.newest.at = back(m.newest.at)
	}
}

// addPass remembers a covered pass.
func (m *durableMarks) addPass(pm passMark) {
	if n := len(m.passes); n >= maxMarks {
		m.passes[n-1] = pm // coarser: the newest covers the one it replaces
		return
	}
	m.passes = append(m.passes, pm)
}

// addFile remembers that ino's changes counted up to mark are in batches
// up to seq; beyond maxFileMarks it is not remembered (a covered pass
// clears it later).
func (m *durableMarks) addFile(ino, mark, seq uint64) {
	if len(m.files) < maxFileMarks {
		m.files = append(m.files, fileMark{ino: ino, mark: mark, seq: seq})
	}
}

// addFiles remembers the files of a pass that were shipped in full (not
// requeued), in batches up to seq.
func (m *durableMarks) addFiles(files, requeued []journal.File, mark, seq uint64) {
	again := make(map[uint64]bool, len(requeued))
	for _, f := range requeued {
		again[f.Key.Ino] = true
	}
	for _, f := range files {
		if len(m.files) >= maxFileMarks {
			return
		}
		if !again[f.Key.Ino] {
			m.files = append(m.files, fileMark{ino: f.Key.Ino, mark: mark, seq: seq})
		}
	}
}

// point forgets the passes the peer made durable (every batch up to
// durable) and returns the newest pass it made durable (zero if none).
func (m *durableMarks) point(durable uint64) passMark {
	var last passMark
	i := 0
	for i < len(m.passes) && m.passes[i].seq <= durable {
		last = m.passes[i]
		i++
	}
	m.passes = m.passes[i:]
	if last.mark > m.newest.mark {
		m.newest = last
	}
	return m.newest
}

// apply forgets in d the changes the peer made durable (every batch up
// to durable): the files shipped whole at once, the changes counted up
// to the newest durable pass at most every clearEvery unless force.
func (m *durableMarks) apply(d *dirtySet, durable uint64, force bool, now time.Time) {
	i := 0
	for i < len(m.files) && m.files[i].seq <= durable {
		d.clearFile(m.files[i].ino, m.files[i].mark)
		i++
	}
	m.files = m.files[i:]
	pm := m.point(durable)
	if pm.mark == 0 || pm.mark <= m.cleared || !force && now.Sub(m.lastClear) < clearEvery {
		return
	}
	d.clear(pm.mark)
	m.cleared, m.lastClear = pm.mark, now
}

// forget drops the marks not yet durable: the session their batches were
// in is lost (see Primary.sessionLost).
func (m *durableMarks) forget() {
	m.passes, m.files = nil, nil
}

// cover is what the build passes covered, for durability calls
// (WaitShipped): the last pass that took every change counted up to
// mark, in batches up to seq. A pass that found reported bytes beyond
// EOF covers them only for the calls begun before it read the files
// (before; zero: every call): a later call's write may be the one whose
// bytes it found missing, reported (write_end) before the size moved.
// Called with Primary.mu held.
type cover struct {
	mark, seq uint64
	before    time.Time
}

// set records a pass (or a resync) that took every change counted up to
// mark, in batches up to seq, and read the files from at on; beyondEOF:
// it found reported bytes beyond EOF.
func (c *cover) set(mark, seq uint64, beyondEOF bool, at time.Time) {
	c.mark, c.seq, c.before = mark, seq, time.Time{}
	if beyondEOF {
		c.before = at
	}
}

// covers reports whether a durability call begun at start, when target
// changes were counted, is covered, and by which batch.
func (c *cover) covers(target uint64, start time.Time) (seq uint64, ok bool) {
	if c.mark >= target && (c.before.IsZero() || start.Before(c.before)) {
		return c.seq, true
	}
	return 0, false
}

// resetTo goes back to a pass the peer made durable: the batches after
// it were lost with their session, and a call must not count itself
// covered by one of them.
func (c *cover) resetTo(pm passMark) {
	c.mark, c.seq, c.before = pm.mark, pm.seq, pm.at
}
