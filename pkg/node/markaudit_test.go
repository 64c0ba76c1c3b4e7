package node

import (
	"context"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/duet-ha/duet/pkg/capture"
	"github.com/duet-ha/duet/pkg/peerlink"
	"github.com/duet-ha/duet/pkg/replica"
)

// fakeMarks is a capture's marks and counters, for auditMarksOnce.
type fakeMarks struct {
	mu     sync.Mutex
	ctr    capture.Counters
	attrs  map[capture.InodeKey]bool
	chunks map[capture.CaptureChunkKey]bool
	// onMarks runs as the marks are read (a record emitted meanwhile).
	onMarks func()
}

func (f *fakeMarks) Counters() (capture.Counters, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.ctr, nil
}

func (f *fakeMarks) Marks() ([]capture.InodeKey, []capture.CaptureChunkKey, error) {
	f.mu.Lock()
	var a []capture.InodeKey
	for k := range f.attrs {
		a = append(a, k)
	}
	var c []capture.CaptureChunkKey
	for k := range f.chunks {
		c = append(c, k)
	}
	hook := f.onMarks
	f.mu.Unlock()
	if hook != nil {
		hook()
	}
	return a, c, nil
}

func (f *fakeMarks) ForgetAttr(k capture.InodeKey) {
	f.mu.Lock()
	delete(f.attrs, k)
	f.mu.Unlock()
}

func (f *fakeMarks) ForgetChunks(keys []capture.CaptureChunkKey) error {
	f.mu.Lock()
	for _, k := range keys {
		delete(f.chunks, k)
	}
	f.mu.Unlock()
	return nil
}

// auditPrimary is a primary of a directory that does not run: its journal
// is what the test puts there.
func auditPrimary(t *testing.T, dev uint32) *replica.Primary {
	t.Helper()
	lk, err := peerlink.New(peerlink.Options{Node: "test", Keys: [][]byte{[]byte("0123456789abcdef")}, Plaintext: true})
	if err != nil {
		t.Fatal(err)
	}
	src := filepath.Join(t.TempDir(), "src")
	if err := os.Mkdir(src, 0o755); err != nil {
		t.Fatal(err)
	}
	p, err := replica.NewPrimary(replica.Dir{Name: "data", Path: src}, "127.0.0.1:1", lk, dev, slog.New(slog.NewTextHandler(io.Discard, nil)))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { p.Close() })
	return p
}

// TestStuckMarksFoundAndRepaired: with the capture quiet and the primaries
// holding nothing, a mark left set is stuck (its inode's changes are no
// longer captured): the audit forgets it, rescans the inode on the
// primaries of its device, and counts it. A mark with its change still in
// a journal, or with the capture emitting meanwhile, is not stuck.
func TestStuckMarksFoundAndRepaired(t *testing.T) {
	n := testNode(t, t.TempDir())
	p := auditPrimary(t, 7)
	other := auditPrimary(t, 8)
	stuck := capture.InodeKey{Dev: 7, Ino: 42}
	f := &fakeMarks{ctr: capture.Counters{Seq: 100},
		attrs:  map[capture.InodeKey]bool{stuck: true},
		chunks: map[capture.CaptureChunkKey]bool{{Dev: 7, Ino: 43, Chunk: 2}: true}}
	drain := func() error { return nil }
	ps := []*replica.Primary{p, other}

	// The capture emits while the marks are read: not judged.
	f.onMarks = func() { f.ctr.Seq++ }
	if got := n.auditMarksOnce(context.Background(), f, drain, ps); got != nil {
		t.Fatalf("marks reported stuck while the capture emitted: %v", got)
	}
	f.onMarks = nil

	// A change still in a journal: its pass will forget the marks.
	p.Rescan(capture.InodeKey{Dev: 7, Ino: 99})
	if got := n.auditMarksOnce(context.Background(), f, drain, ps); got != nil {
		t.Fatalf("marks reported stuck with a change in the journal: %v", got)
	}
	quiet := auditPrimary(t, 7)
	ps = []*replica.Primary{quiet, other}

	start := time.Now()
	got := n.auditMarksOnce(context.Background(), f, drain, ps)
	if len(got) != 2 {
		t.Fatalf("stuck marks found on %v, want inodes 42 and 43", got)
	}
	if time.Since(start) < markAuditSettle {
		t.Errorf("judged without waiting %s for the capture to stay quiet", markAuditSettle)
	}
	if len(f.attrs)+len(f.chunks) != 0 {
		t.Errorf("marks left: %v %v", f.attrs, f.chunks)
	}
	st := quiet.Status()
	if st.StuckMarks != 2 || st.PendingFiles != 2 {
		t.Errorf("primary of the device: %d stuck marks counted, %d files to rescan; want 2 and 2", st.StuckMarks, st.PendingFiles)
	}
	if so := other.Status(); so.StuckMarks != 0 || so.PendingFiles != 0 {
		t.Errorf("primary of another device told of them: %d, %d files", so.StuckMarks, so.PendingFiles)
	}
	if got := n.auditMarksOnce(context.Background(), f, drain, []*replica.Primary{other}); got != nil {
		t.Errorf("found again once forgotten: %v", got)
	}
}
