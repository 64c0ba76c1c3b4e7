package replica

import (
	"errors"
	"fmt"
	"path/filepath"
	"reflect"
	"testing"

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
	root, err := fstree.OpenRoot(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer root.Close()
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
	root, err := fstree.OpenRoot(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer root.Close()
	boom := errors.New("connection reset")
	calls := 0
	_, err = walkManifest(root, wire.ManifestQuery{All: true}, func(e *wire.Entry) error {
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
