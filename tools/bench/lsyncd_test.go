package main

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// TestWaitSameMissedDelete: a copy on nodeB that holds all of nodeA's
// files and one that nodeA removed (a delete lsyncd missed: .git/index.lock
// in a make test run, which failed the whole bench) is taken as done at
// the time nothing of nodeA's was missing, and the entry is named for the
// figure's note; one that lacks a file of nodeA's is still waited for.
func TestWaitSameMissedDelete(t *testing.T) {
	defer func(d time.Duration) { lsyncdMissedAfter = d }(lsyncdMissedAfter)
	lsyncdMissedAfter = 300 * time.Millisecond
	lab := t.TempDir()
	b := &bench{lab: lab}
	for _, h := range []string{"a", "b"} {
		if err := os.MkdirAll(filepath.Join(lab, h, "data", "r", ".git"), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	at := time.Unix(1_700_000_000, 0)
	put := func(h, name string) {
		p := filepath.Join(lab, h, "data", "r", name)
		if err := os.WriteFile(p, []byte(name), 0o644); err != nil {
			t.Fatal(err)
		}
		os.Chtimes(p, at, at)
	}
	put("a", "f")
	put("b", "f")
	put("b", ".git/index.lock")
	start := time.Now()
	got := b.waitSame("r", 10*time.Second)
	if time.Since(start) > 5*time.Second || got > time.Second {
		t.Errorf("took %v (returned %v): a copy with all of nodeA's files and a stale one is done when nothing was missing", time.Since(start), got)
	}
	if len(b.lsyncdMissed) != 1 || !strings.Contains(b.lsyncdMissed[0], ".git/index.lock") {
		t.Errorf("missed deletes %q, want the index.lock named", b.lsyncdMissed)
	}
	// A file of nodeA's that nodeB lacks is waited for: it comes later.
	put("a", "g")
	go func() {
		time.Sleep(time.Second)
		put("b", "g")
	}()
	if got := b.waitSame("r", 10*time.Second); got < 900*time.Millisecond {
		t.Errorf("returned after %v, before nodeB had g", got)
	}
}
