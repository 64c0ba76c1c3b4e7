package fstree

import (
	"crypto/rand"
	"os"
	"path/filepath"
	"testing"

	"github.com/duet-ha/duet/pkg/wire"
)

// TestSumsBlocks: Sums reads in pieces larger than a block; every block,
// the short last one included, sums as it would alone, at each shift.
func TestSumsBlocks(t *testing.T) {
	data := make([]byte, 3<<20+5)
	rand.Read(data)
	p := filepath.Join(t.TempDir(), "f")
	if err := os.WriteFile(p, data, 0o644); err != nil {
		t.Fatal(err)
	}
	f, err := os.Open(p)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	for _, size := range []uint64{0, 1, 4095, 4096, 4097, 1<<20 - 1, 1 << 20, 1<<20 + 1, 3<<20 + 5} {
		for _, shift := range []uint8{0, 12, 14, 16} {
			bs := uint64(1) << wire.BlockShift
			if shift != 0 {
				bs = 1 << shift
			}
			var want []wire.Sum
			for off := uint64(0); off < size; off += bs {
				want = append(want, SumBlock(data[off:min(off+bs, size)]))
			}
			got, err := Sums(f, size, shift)
			if err != nil {
				t.Fatal(err)
			}
			if len(got) != len(want) {
				t.Fatalf("size %d, shift %d: %d sums, want %d", size, shift, len(got), len(want))
			}
			for i := range want {
				if got[i] != want[i] {
					t.Fatalf("size %d, shift %d: block %d sums differently", size, shift, i)
				}
			}
		}
	}
}

// TestSumEntryUnchanged: a file whose size changed since it was listed
// (a new file under a reused inode number looks the same) is left without
// checksums by SumEntryUnchanged, as the requester then sends it whole;
// SumEntry sums it. A change of its attributes alone (the replica's
// applier sets times while duet verify walks it) does not.
func TestSumEntryUnchanged(t *testing.T) {
	dir := t.TempDir()
	p := filepath.Join(dir, "f")
	if err := os.WriteFile(p, []byte("first"), 0o644); err != nil {
		t.Fatal(err)
	}
	root, err := OpenRoot(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer root.Close()
	es, _, err := Scan(root, false)
	if err != nil {
		t.Fatal(err)
	}
	e := es[1]
	same := e
	if err := SumEntryUnchanged(root, &same); err != nil || same.Flags&wire.EntrySummed == 0 {
		t.Fatalf("an unchanged file: summed %v, %v", same.Flags&wire.EntrySummed != 0, err)
	}
	if err := os.Chmod(p, 0o600); err != nil {
		t.Fatal(err)
	}
	attrs := e
	if err := SumEntryUnchanged(root, &attrs); err != nil || attrs.Flags&wire.EntrySummed == 0 {
		t.Fatalf("a file whose mode changed since it was listed: summed %v, %v; want it summed", attrs.Flags&wire.EntrySummed != 0, err)
	}
	if err := os.WriteFile(p, []byte("first, and more"), 0o644); err != nil {
		t.Fatal(err)
	}
	changed := e
	if err := SumEntryUnchanged(root, &changed); err != nil || changed.Flags&wire.EntrySummed != 0 {
		t.Fatalf("a file changed since it was listed: summed %v, %v; want it left without", changed.Flags&wire.EntrySummed != 0, err)
	}
	loose := e
	if err := SumEntry(root, &loose); err != nil || loose.Flags&wire.EntrySummed == 0 {
		t.Fatalf("SumEntry of a changed file: summed %v, %v", loose.Flags&wire.EntrySummed != 0, err)
	}
}
