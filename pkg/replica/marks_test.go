package replica

import (
	"testing"
	"time"

	"github.com/duet-ha/duet/pkg/capture"
	"github.com/duet-ha/duet/pkg/journal"
)

// The bitmap's marks alone: changes are forgotten only once the batch
// that carried them is durable on the peer, a file shipped whole at
// once, a covered pass at most every clearEvery unless forced.

func TestDurableMarksForgetOnlyWhatIsDurable(t *testing.T) {
	d := newDirtySet()
	var m durableMarks
	data := func(ino, count uint64) {
		d.record(&capture.Record{Kind: capture.KindData, Ino: ino, Pos: 0, Len: 4096}, count)
	}
	data(1, 1) // shipped whole in batch 2
	data(2, 2) // covered by the pass of batch 3
	data(3, 3) // after that pass
	m.addFile(1, 1, 2)
	m.addPass(passMark{mark: 2, seq: 3, at: time.Unix(10, 0)})
	now := time.Unix(100, 0)

	m.apply(d, 1, true, now)
	if !d.has(1) || !d.has(2) || !d.has(3) {
		t.Fatal("a change was forgotten before its batch was durable")
	}
	m.apply(d, 2, false, now)
	if d.has(1) || !d.has(2) {
		t.Errorf("batch 2 durable: file 1 kept %v (want forgotten), file 2 kept %v (want kept)", d.has(1), d.has(2))
	}
	m.apply(d, 3, false, now)
	if d.has(2) || !d.has(3) {
		t.Errorf("batch 3 durable: file 2 kept %v (want forgotten), file 3 kept %v (want kept)", d.has(2), d.has(3))
	}
	if !m.lastClear.Equal(now) || m.cleared != 2 {
		t.Fatalf("the clean-up up to 2 was not recorded: at %v, up to %d", m.lastClear, m.cleared)
	}
	// An unforced clean-up waits clearEvery after the last one.
	data(2, 4)
	m.addPass(passMark{mark: 4, seq: 4})
	m.apply(d, 4, false, now.Add(clearEvery/2))
	if !d.has(2) || !d.has(3) {
		t.Error("a pass cleared within clearEvery of the last clean-up, unforced")
	}
	m.apply(d, 4, false, now.Add(clearEvery))
	if d.has(2) || d.has(3) {
		t.Errorf("after clearEvery: file 2 kept %v, file 3 kept %v (want both forgotten)", d.has(2), d.has(3))
	}
	// Forced, it does not wait.
	data(2, 5)
	m.addPass(passMark{mark: 5, seq: 5})
	m.apply(d, 5, true, now.Add(clearEvery))
	if d.has(2) {
		t.Error("a forced clean-up within clearEvery kept what the peer made durable")
	}
	if m.newest.mark != 5 || m.newest.seq != 5 || m.cleared != 5 {
		t.Errorf("newest durable pass %+v, cleared up to %d", m.newest, m.cleared)
	}
	// A lost session forgets the marks not yet durable, passes and
	// files: the change they counted stays in the bitmap for the resync.
	data(3, 6)
	m.addPass(passMark{mark: 6, seq: 6})
	m.addFile(3, 6, 6)
	m.forget()
	m.apply(d, 10, true, now.Add(time.Hour))
	if !d.has(3) {
		t.Error("a mark of a lost session cleared the bitmap")
	}
	if m.newest.mark != 5 {
		t.Errorf("the newest durable pass moved to %+v after forget", m.newest)
	}
}

func TestDurableMarksBounded(t *testing.T) {
	var m durableMarks
	for i := uint64(1); i <= maxMarks+10; i++ {
		m.addPass(passMark{mark: i, seq: i})
	}
	if len(m.passes) != maxMarks {
		t.Fatalf("%d passes remembered, bound %d", len(m.passes), maxMarks)
	}
	// The last slot holds the newest: it covers those it replaced.
	if last := m.passes[maxMarks-1]; last.mark != maxMarks+10 {
		t.Errorf("last mark %+v, want the newest pass", last)
	}
	if pm := m.point(maxMarks + 10); pm.mark != maxMarks+10 || len(m.passes) != 0 {
		t.Errorf("all durable: point %+v, %d left", pm, len(m.passes))
	}
	f := func(ino uint64) journal.File { return journal.File{Key: capture.InodeKey{Ino: ino}} }
	m.addFiles([]journal.File{f(1), f(2), f(3)}, []journal.File{f(2)}, 5, 7)
	if len(m.files) != 2 || m.files[0].ino != 1 || m.files[1].ino != 3 || m.files[1].seq != 7 {
		t.Errorf("files of a pass that requeued file 2: %+v", m.files)
	}
	for i := range maxFileMarks {
		m.addFile(uint64(100+i), 1, 8)
	}
	if len(m.files) != maxFileMarks {
		t.Errorf("%d files remembered, bound %d", len(m.files), maxFileMarks)
	}
}

func TestCoverOfDurabilityCalls(t *testing.T) {
	var c cover
	t0 := time.Unix(50, 0)
	if _, ok := c.covers(1, t0); ok {
		t.Fatal("nothing built, yet a call counting one change is covered")
	}
	c.set(5, 9, false, t0)
	if seq, ok := c.covers(5, t0.Add(time.Hour)); !ok || seq != 9 {
		t.Errorf("a pass up to 5 (batch 9), a call counting 5: covered %v by %d", ok, seq)
	}
	if _, ok := c.covers(6, t0); ok {
		t.Error("a call counting a change the pass did not take is covered")
	}
	// Bytes beyond EOF: only calls begun before the pass read the files.
	c.set(7, 12, true, t0)
	if _, ok := c.covers(7, t0.Add(-time.Millisecond)); !ok {
		t.Error("a call begun before the pass read the files is not covered")
	}
	if _, ok := c.covers(7, t0); ok {
		t.Error("a call begun as the pass read the files is covered: its write may be the bytes it found missing")
	}
	// A lost session: back to the pass the peer made durable.
	c.resetTo(passMark{mark: 4, seq: 8, at: t0})
	if _, ok := c.covers(5, t0.Add(-time.Second)); ok {
		t.Error("covered by a batch of the lost session")
	}
	if seq, ok := c.covers(4, t0.Add(-time.Second)); !ok || seq != 8 {
		t.Errorf("the durable pass covers its own calls: %v, %d", ok, seq)
	}
}
