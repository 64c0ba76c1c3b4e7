package replica

import (
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/duet-ha/duet/pkg/wire"
)

// Tests from a second review of markBitmapCompared's shadow (ca9d8d2):
// both failed on it (every other name of a hard-linked file looked moved).

// A tree that did not change at all while the peer was away, whose files
// have two names (hard links: cp -al, rsnapshot, pnpm's store, git's
// local clones): pathIs knows only an inode's first name, so every other
// name looks moved and is compared by checksums, in every bitmap resync.
func TestMarkBitmapComparedUnchangedHardLinks(t *testing.T) {
	src := t.TempDir()
	for _, n := range []string{"f1", "f2", "f3"} {
		writeRandom(t, filepath.Join(src, "d", n), 10)
		os.MkdirAll(filepath.Join(src, "e"), 0o755)
		if err := os.Link(filepath.Join(src, "d", n), filepath.Join(src, "e", n)); err != nil {
			t.Fatal(err)
		}
	}
	root, entries := scanSource(t, src)
	sh := newShadow(entries) // what the peer was given: the same tree
	local, _, err := scanListing(root, false)
	if err != nil {
		t.Fatal(err)
	}
	if paths, _ := markBitmapCompared(local, newDirtySet(), sh); len(paths) > 0 {
		t.Errorf("nothing changed, yet %d files are compared by checksums: %q", len(paths), paths)
	}
}

// The same at scale: more hard-linked names than a manifest query takes
// (wire.MaxWant) turn every bitmap resync of an unchanged tree into a
// comparison of every file (Primary.escalate).
func TestMarkBitmapComparedHardLinksEscalate(t *testing.T) {
	n := wire.MaxWant + 1
	es := []wire.Entry{{Path: ".", Ino: 1, Mode: fs.ModeDir | 0o755},
		{Path: "a", Ino: 2, Mode: fs.ModeDir | 0o755}}
	for i := range n {
		es = append(es, wire.Entry{Path: fmt.Sprintf("a/f%07d", i), Ino: uint64(10 + i), Mode: 0o644, Size: 10, Mtime: 5, Ctime: 5})
	}
	es = append(es, wire.Entry{Path: "b", Ino: 3, Mode: fs.ModeDir | 0o755})
	for i := range n {
		es = append(es, wire.Entry{Path: fmt.Sprintf("b/f%07d", i), Ino: uint64(10 + i), Mode: 0o644, Size: 10, Mtime: 5, Ctime: 5})
	}
	sh := newShadow(es)
	start := time.Now()
	paths, _ := markBitmapCompared(listingOf(es), newDirtySet(), sh)
	t.Logf("%d entries: %d paths named, in %v", len(es), len(paths), time.Since(start))
	if len(paths) > wire.MaxWant {
		t.Errorf("an unchanged tree: %d paths named for checksums (limit %d), the resync escalates to comparing every file", len(paths), wire.MaxWant)
	}
}
