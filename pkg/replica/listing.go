package replica

import (
	"os"
	"slices"

	"github.com/duet-ha/duet/pkg/fstree"
	"github.com/duet-ha/duet/pkg/wire"
)

// listingChunk is how many entries a chunk of a listing holds (about
// 500 KB of them). Tests make it small.
var listingChunk = 4096

// listing is a tree's listing in Scan order, held in chunks of
// listingChunk entries so that a full sync can let go of the part it has
// compared while it builds the shadow: the listing (about 155 bytes a
// file) and the shadow (about 130) were both held whole, the largest part
// of the comparison's peak. Entries do not move once listed.
type listing struct {
	chunks [][]wire.Entry
	n      int
}

// scanListing lists the tree under root as fstree.Scan does.
func scanListing(root *os.File, sums bool) (*listing, int, error) {
	l := &listing{}
	tooLong, err := fstree.Walk(root, sums, func(e *wire.Entry) error {
		l.add(e)
		return nil
	})
	if err != nil {
		return nil, 0, err
	}
	return l, tooLong, nil
}

// listingOf holds es (not copied) as a listing.
func listingOf(es []wire.Entry) *listing {
	l := &listing{n: len(es)}
	for i := 0; i < len(es); i += listingChunk {
		end := min(i+listingChunk, len(es))
		l.chunks = append(l.chunks, es[i:end:end])
	}
	return l
}

// add appends a copy of e.
func (l *listing) add(e *wire.Entry) {
	if l.n%listingChunk == 0 {
		l.chunks = append(l.chunks, make([]wire.Entry, 0, listingChunk))
	}
	c := &l.chunks[len(l.chunks)-1]
	*c = append(*c, *e)
	l.n++
}

func (l *listing) len() int { return l.n }

// at is entry i. It must not have been released.
func (l *listing) at(i int) *wire.Entry { return &l.chunks[i/listingChunk][i%listingChunk] }

// release lets go of the chunks that end at or before entry end: at
// panics for their entries from then on.
func (l *listing) release(end int) {
	for k := range min(end/listingChunk, len(l.chunks)) {
		l.chunks[k] = nil
	}
}

// sortByPath puts the listing in Scan order (fstree.ComparePaths) unless
// it is already; entries with equal paths keep their order.
func (l *listing) sortByPath() {
	for i := 1; i < l.n; i++ {
		if fstree.ComparePaths(l.at(i-1).Path, l.at(i).Path) > 0 {
			es := make([]wire.Entry, 0, l.n)
			for _, c := range l.chunks {
				es = append(es, c...)
			}
			slices.SortStableFunc(es, func(a, b wire.Entry) int { return fstree.ComparePaths(a.Path, b.Path) })
			*l = *listingOf(es)
			return
		}
	}
}
