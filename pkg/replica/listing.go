package replica

import (
	"io/fs"
	"os"
	"slices"

	"github.com/duet-ha/duet/pkg/fstree"
	"github.com/duet-ha/duet/pkg/wire"
)

// listingChunk is how many entries a chunk of a listing holds (about
// 330 KB of them). Tests make it small.
var listingChunk = 4096

// listing is a tree's listing in Scan order, as a full sync holds it: in
// chunks of listingChunk entries, so that it can let go of the part it has
// compared while it builds the shadow (the listing and the shadow were
// held whole at once, the largest part of the comparison's peak), each
// entry in 88 bytes where a wire.Entry takes 120. Entries do not move
// once listed.
type listing struct {
	chunks [][]lentry
	n      int
}

// lentry is a wire.Entry of a listing, in 88 bytes. What most entries
// lack is behind pointers: checksums (a full comparison's regular files),
// a symlink's target or a device's number.
type lentry struct {
	path  string
	ino   uint64
	size  uint64
	mtime int64
	ctime int64
	mode  fs.FileMode
	uid   uint32
	gid   uint32
	gen   uint32
	flags wire.EntryFlags
	shift uint8 // of sums' blocks (wire.Entry.Shift)
	sums  *[]wire.Sum
	rare  *lrare
}

type lrare struct {
	target string
	rdev   uint64
}

func toLentry(e *wire.Entry) lentry {
	l := lentry{path: e.Path, ino: e.Ino, size: e.Size, mtime: e.Mtime, ctime: e.Ctime, mode: e.Mode, uid: e.UID, gid: e.GID, gen: e.Gen, flags: e.Flags, shift: e.Shift}
	l.setSums(e.Sums)
	if e.Target != "" || e.Rdev != 0 {
		l.rare = &lrare{target: e.Target, rdev: e.Rdev}
	}
	return l
}

func (l *lentry) setSums(sums []wire.Sum) {
	l.sums = nil
	if sums != nil {
		l.sums = &sums
	}
}

// entry is l as a wire.Entry.
func (l *lentry) entry() wire.Entry {
	e := wire.Entry{Path: l.path, Ino: l.ino, Size: l.size, Mtime: l.mtime, Ctime: l.ctime, Mode: l.mode, UID: l.uid, GID: l.gid, Gen: l.gen, Flags: l.flags, Shift: l.shift}
	if l.sums != nil {
		e.Sums = *l.sums
	}
	if l.rare != nil {
		e.Target, e.Rdev = l.rare.target, l.rare.rdev
	}
	return e
}

// sum gives regular file l its checksums (fstree.SumEntry), of blocks of
// 1 << l.shift bytes.
func (l *lentry) sum(root *os.File) error {
	e := l.entry()
	if err := fstree.SumEntry(root, &e); err != nil {
		return err
	}
	l.flags = e.Flags
	l.setSums(e.Sums)
	return nil
}

// scanListing lists the tree under root as fstree.Scan does, with each
// inode's generation (the shadow is built from it).
func scanListing(root *os.File, sums bool) (*listing, int, error) {
	l := &listing{}
	tooLong, err := fstree.WalkGens(root, sums, func(e *wire.Entry) error {
		l.add(e)
		return nil
	})
	if err != nil {
		return nil, 0, err
	}
	return l, tooLong, nil
}

// listingOf lists es.
func listingOf(es []wire.Entry) *listing {
	l := &listing{}
	for i := range es {
		l.add(&es[i])
	}
	return l
}

// add appends e.
func (l *listing) add(e *wire.Entry) {
	if l.n%listingChunk == 0 {
		l.chunks = append(l.chunks, make([]lentry, 0, listingChunk))
	}
	c := &l.chunks[len(l.chunks)-1]
	*c = append(*c, toLentry(e))
	l.n++
}

func (l *listing) len() int { return l.n }

// at is entry i. It must not have been released.
func (l *listing) at(i int) *lentry { return &l.chunks[i/listingChunk][i%listingChunk] }

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
		if fstree.ComparePaths(l.at(i-1).path, l.at(i).path) > 0 {
			es := make([]lentry, 0, l.n)
			for _, c := range l.chunks {
				es = append(es, c...)
			}
			slices.SortStableFunc(es, func(a, b lentry) int { return fstree.ComparePaths(a.path, b.path) })
			*l = listing{n: len(es)}
			for i := 0; i < len(es); i += listingChunk {
				end := min(i+listingChunk, len(es))
				l.chunks = append(l.chunks, es[i:end:end])
			}
			return
		}
	}
}
