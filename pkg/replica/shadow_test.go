package replica

import (
	"io/fs"
	"testing"

	"github.com/duet-ha/duet/pkg/wire"
)

func testShadow() *shadow {
	return newShadow([]wire.Entry{
		{Path: ".", Mode: fs.ModeDir, Ino: 1},
		{Path: "d", Mode: fs.ModeDir, Ino: 2},
		{Path: "d/e", Mode: fs.ModeDir, Ino: 3},
		{Path: "d/e/f", Ino: 4},
		{Path: "g", Ino: 4}, // hard link
	})
}

func TestShadowPaths(t *testing.T) {
	s := testShadow()
	for ino, want := range map[uint64]string{1: ".", 2: "d", 3: "d/e", 4: "d/e/f"} {
		if got, ok := s.path(ino); !ok || got != want {
			t.Errorf("path(%d) = %q, %v; want %q", ino, got, ok, want)
		}
	}
	s.move(2, link{1, "d"}, 1, "x")
	if got, _ := s.path(4); got != "x/e/f" {
		t.Errorf("after moving d to x: path(4) = %q", got)
	}
}

// Forgetting a directory must detach its whole subtree, so that a reused
// inode number never resolves to a stale path.
func TestShadowForgetDetachesSubtree(t *testing.T) {
	s := testShadow()
	s.unlink(1, "d")
	if _, ok := s.nodes[2]; ok {
		t.Fatal("d still in shadow")
	}
	if _, ok := s.nodes[3]; ok {
		t.Fatal("d/e still in shadow")
	}
	// The hard-linked file keeps its other name.
	if got, ok := s.path(4); !ok || got != "g" {
		t.Fatalf("path(4) = %q, %v; want g", got, ok)
	}
	// Number 2 reused by a file: nothing may resolve through it.
	s.add(2, 0, 1, "reused")
	for ino := range s.nodes {
		if p, ok := s.path(ino); ok && (p == "reused/e" || p == "reused/e/f") {
			t.Fatalf("stale child resolves through the reused number: %q", p)
		}
	}
}

func TestShadowDropWithMissingParent(t *testing.T) {
	s := testShadow()
	n := s.nodes[4]
	delete(s.nodes, 3) // an inconsistent parent must not hang drop
	s.drop(n)
	if _, ok := s.nodes[4]; ok {
		t.Fatal("node not dropped")
	}
	if _, ok := s.nodes[1].children["g"]; ok {
		t.Fatal("name g left behind")
	}
}
