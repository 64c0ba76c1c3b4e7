package lab

import (
	"strings"
	"testing"
	"time"

	"github.com/duet-ha/duet/tools/lab/linearize"
)

// An acknowledged entry is excused as never committed only when both hold:
// acknowledged while the primary's disk was full, and absent from the
// primary's own binary logs at the crash; "/counter/89" is not found in a
// log that holds "/counter/893".
func TestNotCommittedNeedsWindowAndAbsence(t *testing.T) {
	t0 := time.Date(2026, 12, 4, 21, 32, 3, 0, time.UTC)
	s := &stackLoad{full: []fullDisk{{from: t0, to: t0.Add(3 * time.Second),
		binlogs: []byte("INSERT ... SELECT '/counter/893', 1 ... 'c1-885' ...")}}}
	for _, c := range []struct {
		value string
		at    time.Time
		want  bool
	}{
		{"/counter/894", t0.Add(time.Second), true},        // in the window, never logged
		{"/counter/893", t0.Add(time.Second), false},       // committed
		{"/counter/89", t0.Add(time.Second), true},         // a prefix of a committed one is not it
		{"/counter/894", t0.Add(-time.Millisecond), false}, // before the disk filled: a loss
		{"/counter/894", t0.Add(4 * time.Second), false},   // after the crash: a loss
		{"c1-885", t0.Add(2 * time.Second), false},
		{"c1-88", t0.Add(2 * time.Second), true},
	} {
		if got := s.notCommitted(c.value, c.at) != ""; got != c.want {
			t.Errorf("notCommitted(%q, +%v) = %v, want %v", c.value, c.at.Sub(t0), got, c.want)
		}
	}
}

// The history's acknowledged puts that were never committed become puts
// of unknown outcome; gets and committed puts stay as they were.
func TestHistoryNotCommittedPutsBecomeUnknown(t *testing.T) {
	at := time.Now()
	h := &etcdHistory{ops: []linearize.Op{
		{Kind: linearize.Put, Key: "/lin/k0", Value: "c0-1", Return: at},
		{Kind: linearize.Put, Key: "/lin/k0", Value: "c0-2", Return: at},
		{Kind: linearize.Get, Key: "/lin/k0", Output: "c0-1", Return: at},
	}}
	h.notCommitted(t, func(v string, _ time.Time) string {
		if strings.HasSuffix(v, "-2") {
			return "test"
		}
		return ""
	})
	if h.ops[0].Unknown || !h.ops[1].Unknown || h.ops[2].Unknown || h.unknown != 1 {
		t.Errorf("after notCommitted: %+v (%d unknown); want only the second put unknown", h.ops, h.unknown)
	}
}
