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
