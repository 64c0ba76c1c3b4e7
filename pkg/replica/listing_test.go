package replica

import (
	"fmt"
	"io/fs"
	"reflect"
	"testing"

	"github.com/duet-ha/duet/pkg/wire"
)

// A listing gives back every entry as it was listed, every field of it,
// across chunks and after those before are let go.
func TestListingKeepsEntries(t *testing.T) {
	defer func(n int) { listingChunk = n }(listingChunk)
	listingChunk = 3
	es := []wire.Entry{
		{Path: ".", Mode: fs.ModeDir | 0o755, Ino: 2},
		{Path: "f", Mode: 0o600, UID: 1, GID: 2, Flags: wire.EntryRecent | wire.EntrySummed, Size: 5000, Mtime: -1, Ino: 3, Ctime: 7,
			Sums: []wire.Sum{{1}, {2}}},
		{Path: "l", Mode: fs.ModeSymlink | 0o777, Target: "f", Ino: 4},
		{Path: "n", Mode: fs.ModeDevice | 0o644, Rdev: 0x801, Ino: 5},
		{Path: "e", Mode: 0o644, Flags: wire.EntrySummed, Sums: []wire.Sum{}, Ino: 6},
		{Path: "z", Mode: 0o644, Size: 1, Mtime: 1 << 62, Ctime: 1 << 61, Ino: 1 << 63},
	}
	for i := range 10 {
		es = append(es, wire.Entry{Path: fmt.Sprintf("z%d", i), Mode: 0o644, Ino: uint64(100 + i)})
	}
	l := listingOf(es)
	if l.len() != len(es) || len(l.chunks) != (len(es)+2)/3 {
		t.Fatalf("%d entries in %d chunks, want %d in %d", l.len(), len(l.chunks), len(es), (len(es)+2)/3)
	}
	for i := range es {
		l.release(i)
		if got := l.at(i).entry(); !reflect.DeepEqual(got, es[i]) {
			t.Errorf("entry %d: %+v, want %+v", i, got, es[i])
		}
	}
}
