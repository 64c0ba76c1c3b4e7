package replica

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"reflect"
	"testing"
	"time"

	"github.com/duet-ha/duet/pkg/fstree"
	"github.com/duet-ha/duet/pkg/wire"
)

// TestWalkManifestOrderAndSums: the manifest's files are summed several
// at a time, yet listed in the walk's order with the sums a plain scan
// computes, big files (slow to sum) among small ones.
func TestWalkManifestOrderAndSums(t *testing.T) {
	dir := t.TempDir()
	for i := range 40 {
		n := 100 + i*37
		if i%7 == 0 {
			n = 3<<20 + i // summed long after the small ones queued behind it
		}
		writeRandom(t, filepath.Join(dir, fmt.Sprintf("d%d/f%02d", i%3, i)), n)
	}
	root := testRoot(t, dir)
	want, _, err := fstree.Scan(root, true)
	if err != nil {
		t.Fatal(err)
	}
	var got []wire.Entry
	if _, err := walkManifest(root, wire.ManifestQuery{All: true}, func(e *wire.Entry) error {
		got = append(got, *e)
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	if len(got) != len(want) {
		t.Fatalf("%d entries, want %d", len(got), len(want))
	}
	for i := range want {
		g, w := got[i], want[i]
		if g.Path != w.Path || g.Flags != w.Flags || !reflect.DeepEqual(g.Sums, w.Sums) {
			t.Fatalf("entry %d: %s flags %#x, %d sums; want %s flags %#x, %d sums", i, g.Path, g.Flags, len(g.Sums), w.Path, w.Flags, len(w.Sums))
		}
	}
}

// TestWalkManifestStopsAtFnError: an error of fn (the connection to the
// requester failed) ends the walk with it, and fn is not called again.
func TestWalkManifestStopsAtFnError(t *testing.T) {
	dir := t.TempDir()
	for i := range 300 {
		writeRandom(t, filepath.Join(dir, fmt.Sprintf("f%03d", i)), 5000)
	}
	root := testRoot(t, dir)
	boom := errors.New("connection reset")
	calls := 0
	_, err := walkManifest(root, wire.ManifestQuery{All: true}, func(e *wire.Entry) error {
		calls++
		if calls == 10 {
			return boom
		}
		return nil
	})
	if !errors.Is(err, boom) || calls != 10 {
		t.Fatalf("walk returned %v after %d calls of fn; want %v after 10", err, calls, boom)
	}
}

// TestOrderedSumsHoldsBounded: while fn is held up (a slow connection to
// the requester), the walk goes on only until the checksums queued reach
// sumsHeld (or one file alone holds more); the serial walk held one
// file's. Then the rest comes, in order.
func TestOrderedSumsHoldsBounded(t *testing.T) {
	defer func(h uint64) { sumsHeld = h }(sumsHeld)
	sumsHeld = 64 // four files of 16 blocks
	dir := t.TempDir()
	for i := range 40 {
		writeRandom(t, filepath.Join(dir, fmt.Sprintf("f%02d", i)), 16<<16)
	}
	writeRandom(t, filepath.Join(dir, "g-big"), 100<<16) // alone past the bound
	root := testRoot(t, dir)
	gate := make(chan struct{})
	var got []string
	s := newOrderedSums(root, func(e *wire.Entry) error {
		if len(got) == 1 {
			<-gate
		}
		got = append(got, e.Path)
		return nil
	})
	walked := make(chan error, 1)
	go func() {
		_, err := fstree.Walk(root, false, func(e *wire.Entry) error { return s.add(e, e.Mode.IsRegular()) })
		walked <- err
	}()
	// Until the walk has queued something and stopped moving: the bound
	// holds whenever it is read.
	last := uint64(0)
	deadline := time.Now().Add(30 * time.Second)
	for stable := 0; stable < 20 || last == 0; time.Sleep(5 * time.Millisecond) {
		s.mu.Lock()
		held := s.held
		s.mu.Unlock()
		if held > sumsHeld {
			t.Fatalf("%d checksums held while fn waits, bound %d", held, sumsHeld)
		}
		if held == last {
			stable++
		} else {
			stable, last = 0, held
		}
		if last == 0 && time.Now().After(deadline) {
			t.Fatal("nothing queued in 30 s while fn waits")
		}
	}
	close(gate)
	if err := <-walked; err != nil {
		t.Fatal(err)
	}
	if err := s.close(); err != nil {
		t.Fatal(err)
	}
	if len(got) != 42 || got[0] != "." || got[41] != "g-big" {
		t.Fatalf("%d entries handed on (%v ... ), want 42 in order", len(got), got[:min(3, len(got))])
	}
	if s.held != 0 {
		t.Fatalf("%d checksums still counted after the walk", s.held)
	}
}

// testRoot opens dir as fstree.OpenRoot does, closed when t ends.
func testRoot(t *testing.T, dir string) *os.File {
	t.Helper()
	root, err := fstree.OpenRoot(dir)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { root.Close() })
	return root
}
