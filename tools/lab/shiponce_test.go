package lab

import (
	"path/filepath"
	"testing"
	"time"
)

// batchesApplied is what nodeB's replica has applied so far.
func (l *Lab) batchesApplied(t *testing.T, host string) uint64 {
	t.Helper()
	var n uint64
	for _, r := range l.Status(t, host).Replicas {
		n += r.Batches
	}
	return n
}

// TestSyncWriteShippedOnce: a writer under `duet exec` that appends a
// record and fdatasyncs it, 300 times, costs the peer one batch a record
// (an apply, and the flush its call asks for), not two. The build pass's
// own read of each record moved the file's access time (relatime), the
// capture reported that as a change of the file, and a second pass
// shipped the size and times again: 2 batches a call, the second one's
// apply and often a second flush on every synchronous write's path. Any
// other change duet makes to the files it reads would show here the same
// way.
func TestSyncWriteShippedOnce(t *testing.T) {
	b := duetBinary(t)
	writer := buildSyncWriter(t, b)
	l := Up(t, b)
	l.Start(t, "b")
	l.Start(t, "a")
	l.WaitPrimary(t, time.Minute)
	l.WaitSync(t, time.Minute)
	const records = 300
	before := l.batchesApplied(t, "b")
	w := l.startSyncWriter(t, writer, "a", filepath.Join(l.AData, "once"), "-max", "300")
	acked, stderr := w.wait(t, "its last record")
	if acked != records {
		t.Fatalf("the writer acknowledged %d records, want %d (%s)", acked, records, stderr)
	}
	l.WaitSync(t, time.Minute)
	got := l.batchesApplied(t, "b") - before
	t.Logf("%d records written and fdatasynced one by one: nodeB applied %d batches (%.2f a record)", records, got, float64(got)/records)
	if float64(got) > 1.25*records {
		t.Fatalf("nodeB applied %d batches for %d synchronous writes: more than one a write", got, records)
	}
}
