package replica

import (
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"maps"
	"os"
	"slices"

	"github.com/duet-ha/duet/pkg/capture"
	"github.com/duet-ha/duet/pkg/journal"
)

// DirtyChunk is the unit of the modification bitmap: a page, the unit in
// which the kernel dirties and writes back file data. Scattered 4 KiB
// writes (database pages) resync as 4 KiB, not as a larger block around
// each one.
const DirtyChunk = 4 << 10

// dirtyFile is what changed in one inode since its peer last had it
// durably: chunks (each with the count of the last change touching it),
// a tail from which every byte changed (a truncate), metadata, or
// everything (a record about it was lost). born: the inode was made
// since (its number may have named another file, and the peer has no
// copy of it anywhere). moved: the path the peer was given for it may
// not be its path any more, whatever its times say (see setMoved).
// blind: its metadata changed while the primary held no shadow of the
// peer's names (see setBlind).
type dirtyFile struct {
	chunks    map[uint64]uint64
	tail      uint64
	tailTouch uint64
	attr      uint64
	whole     uint64
	born      uint64
	moved     uint64
	blind     uint64
}

func (f *dirtyFile) touch() uint64 {
	return max(f.tailTouch, f.attr, f.whole, f.born, f.moved, f.blind)
}

// dirtySet is the modification bitmap of one directory: every change not
// yet durable on the peer. A change is forgotten only once a build pass
// that took it has been made durable by the peer and no later change
// touched the same chunk. It is saved at a clean stop and loaded at the
// next start; after a crash it is lost, and the resync falls back to the
// files changed since the last sync point.
type dirtySet struct {
	files map[uint64]*dirtyFile // by inode
	// peak is the most files the set held since files was made: a Go map
	// keeps the room of its peak, and a burst (a tree unpacked, the
	// writeback of many new files) would hold it, tens of bytes a file,
	// for as long as the daemon runs (see shrink).
	peak   int
	chunks int
	// lost: changes were lost (capture overflow of whole trees): the set
	// does not cover everything.
	lost bool
}

func newDirtySet() *dirtySet { return &dirtySet{files: map[uint64]*dirtyFile{}} }

func (d *dirtySet) get(ino uint64) *dirtyFile {
	f := d.files[ino]
	if f == nil {
		f = &dirtyFile{}
		d.files[ino] = f
		d.peak = max(d.peak, len(d.files))
	}
	return f
}

// shrinkAt is the peak under which the map is not made anew; freeAfter
// the peak from which the memory freed is handed back at once (about 5
// MiB of the map's room and the files' records).
const shrinkAt, freeAfter = 4096, 65536

// shrink makes the map anew, with only the files it holds, once they are
// an eighth of its peak or fewer. It says whether the peak was a burst
// worth handing back to the system at once (see clearDirty).
func (d *dirtySet) shrink() (big bool) {
	if d.peak < shrinkAt || len(d.files) > d.peak/8 {
		return false
	}
	big = d.peak >= freeAfter
	// Not maps.Clone: it copies the tables as they are, room included.
	m := make(map[uint64]*dirtyFile, len(d.files))
	maps.Copy(m, d.files)
	d.files, d.peak = m, len(m)
	return big
}

func (d *dirtySet) span(f *dirtyFile, off, n, touch uint64) {
	if n == 0 {
		return
	}
	if n >= journal.Unbounded || off+n < off {
		if f.tailTouch == 0 || off < f.tail {
			f.tail = off
		}
		f.tailTouch = touch
		return
	}
	if f.chunks == nil {
		f.chunks = map[uint64]uint64{}
	}
	for c := off / DirtyChunk; c <= (off+n-1)/DirtyChunk; c++ {
		if _, ok := f.chunks[c]; !ok {
			d.chunks++
		}
		f.chunks[c] = touch
	}
}

// record folds one capture record in; touch is the primary's change count.
func (d *dirtySet) record(r *capture.Record, touch uint64) {
	f := d.get(r.Ino)
	switch r.Kind {
	case capture.KindData, capture.KindMmap, capture.KindPreop:
		d.span(f, r.Pos, r.Len, touch)
	case capture.KindNew:
		f.attr, f.born = touch, touch
	default:
		f.attr = touch
	}
}

// hold marks with the count touch what f and its operations in progress
// (ops) change: a change the journal still holds after a pass or a resync
// took the others must outlive the marks of that pass or resync
// (Primary.holdKept). The file's other marks are left as they are: what
// the pass shipped of it is forgotten once its batch is durable (a file
// with an operation in progress at every pass kept every chunk it ever
// wrote marked, from a review).
func (d *dirtySet) hold(f *journal.File, ops []journal.Span, touch uint64) {
	df := d.get(f.Key.Ino)
	for _, s := range f.Data.Spans() {
		d.span(df, s.Off, s.Len(), touch)
	}
	for _, s := range ops {
		d.span(df, s.Off, s.Len(), touch) // to the end of file from journal.Unbounded on
	}
	if f.HasTail {
		d.span(df, f.Tail, journal.Unbounded, touch)
	}
	if f.Attr {
		df.attr = touch
	}
	if f.Rescan {
		df.whole = touch
	}
	if f.NewSeq != 0 {
		df.born = touch
	}
	if len(df.chunks) == 0 && df.touch() == 0 {
		delete(d.files, f.Key.Ino)
	}
}

// setMoved marks ino as named on the peer by another path than the one
// the shadow gives it now: a pass shipped its rename in a batch the peer
// may not have applied (the shadow moves when a batch is built), or, at
// a clean stop, the shadow's path for it no longer leads to it. A resync
// trusting the bitmap compares what it holds by checksums
// (markBitmapCompared) even where its times no longer tell the move.
func (d *dirtySet) setMoved(ino, touch uint64) {
	d.get(ino).moved = max(touch, 1)
}

// setBlind marks a metadata change of ino made while the primary held no
// shadow of the peer's names (a term before its first resync: after a
// start, or a handover): had it been a directory's move, neither a shadow
// nor, at the stop, flagMoved could tell. A resync trusting the bitmap
// takes such a directory as moved (markBitmapCompared).
func (d *dirtySet) setBlind(ino, touch uint64) {
	d.get(ino).blind = max(touch, 1)
}

// isBlind reports whether ino is marked blind (setBlind).
func (d *dirtySet) isBlind(ino uint64) bool {
	f := d.files[ino]
	return f != nil && f.blind != 0
}

// wasMoved reports whether ino is marked moved (setMoved).
func (d *dirtySet) wasMoved(ino uint64) bool {
	f := d.files[ino]
	return f != nil && f.moved != 0
}

// rescan marks a whole inode changed (a record about it was lost).
func (d *dirtySet) rescan(ino, touch uint64) {
	d.get(ino).whole = touch
}

// clear forgets every change counted up to mark: the peer has it durably.
func (d *dirtySet) clear(mark uint64) {
	for ino := range d.files {
		d.clearFile(ino, mark)
	}
}

// clearFile forgets the changes of one inode counted up to mark.
func (d *dirtySet) clearFile(ino, mark uint64) {
	f := d.files[ino]
	if f == nil {
		return
	}
	for c, t := range f.chunks {
		if t <= mark {
			delete(f.chunks, c)
			d.chunks--
		}
	}
	if len(f.chunks) == 0 {
		f.chunks = nil // its room too (a big file written all over)
	}
	if f.tailTouch <= mark {
		f.tailTouch, f.tail = 0, 0
	}
	if f.attr <= mark {
		f.attr = 0
	}
	if f.whole <= mark {
		f.whole = 0
	}
	if f.born <= mark {
		f.born = 0
	}
	if f.moved <= mark {
		f.moved = 0
	}
	if f.blind <= mark {
		f.blind = 0
	}
	if len(f.chunks) == 0 && f.touch() == 0 {
		delete(d.files, ino)
	}
}

// bytes is how much data the set marks (tails not counted).
func (d *dirtySet) bytes() uint64 {
	if d == nil {
		return 0
	}
	return uint64(d.chunks) * DirtyChunk
}

// clone copies the set, for a resync to read while changes go on.
func (d *dirtySet) clone() *dirtySet {
	c := &dirtySet{files: make(map[uint64]*dirtyFile, len(d.files)), chunks: d.chunks, lost: d.lost}
	for ino, f := range d.files {
		g := *f
		if f.chunks != nil {
			g.chunks = make(map[uint64]uint64, len(f.chunks))
			for k, v := range f.chunks {
				g.chunks[k] = v
			}
		}
		c.files[ino] = &g
	}
	return c
}

// spans returns the changed ranges of ino within size, merged; whole is
// set when the whole file must be compared or sent: a record about it was
// lost, or the inode was made since the peer last had it (the file the
// peer holds under its name is another one: its bytes where this one has
// holes or was never written are not this file's).
func (d *dirtySet) spans(ino, size uint64) (spans []journal.Span, whole bool) {
	f := d.files[ino]
	if f == nil {
		return nil, false
	}
	if f.whole != 0 || f.born != 0 {
		return nil, true
	}
	cs := make([]uint64, 0, len(f.chunks))
	for c := range f.chunks {
		cs = append(cs, c)
	}
	slices.Sort(cs)
	var r journal.Ranges
	for _, c := range cs {
		r.Add(c*DirtyChunk, DirtyChunk)
	}
	if f.tailTouch != 0 && f.tail < size {
		r.Add(f.tail, size-f.tail)
	}
	for _, s := range r.Spans() {
		s.End = min(s.End, size)
		if s.Off < s.End {
			spans = append(spans, s)
		}
	}
	return spans, false
}

// has reports whether ino changed at all (data, size or metadata).
func (d *dirtySet) has(ino uint64) bool { return d.files[ino] != nil }

// attrOnly reports whether only ino's metadata changed (no data, no size,
// not lost).
func (d *dirtySet) attrOnly(ino uint64) bool {
	f := d.files[ino]
	return f != nil && f.attr != 0 && len(f.chunks) == 0 && f.tailTouch == 0 && f.whole == 0
}

// dirtyMagic heads a saved bitmap. DUETDIRTY2 added the born mark (flag
// 8), DUETDIRTY3 the moved and blind marks (flags 16, 32): a build that
// knows only an older one refuses it (and compares the files changed
// since the sync point) rather than reading a born or moved file as an
// ordinary one; the older files, without those marks, are still read.
const (
	dirtyMagic   = "DUETDIRTY3"
	dirtyMagicV2 = "DUETDIRTY2"
	dirtyMagicV1 = "DUETDIRTY1"
)

// save writes the set durably to path, relative to generation base.
func (d *dirtySet) save(path string, base uint64) error {
	b := []byte(dirtyMagic)
	b = binary.LittleEndian.AppendUint64(b, base)
	lost := byte(0)
	if d.lost {
		lost = 1
	}
	b = append(b, lost)
	b = binary.AppendUvarint(b, uint64(len(d.files)))
	for ino, f := range d.files {
		var flags byte
		if f.attr != 0 {
			flags |= 1
		}
		if f.whole != 0 {
			flags |= 2
		}
		if f.tailTouch != 0 {
			flags |= 4
		}
		if f.born != 0 {
			flags |= 8
		}
		if f.moved != 0 {
			flags |= 16
		}
		if f.blind != 0 {
			flags |= 32
		}
		b = binary.AppendUvarint(b, ino)
		b = append(b, flags)
		b = binary.AppendUvarint(b, f.tail)
		cs := make([]uint64, 0, len(f.chunks))
		for c := range f.chunks {
			cs = append(cs, c)
		}
		slices.Sort(cs)
		b = binary.AppendUvarint(b, uint64(len(cs)))
		prev := uint64(0)
		for _, c := range cs {
			b = binary.AppendUvarint(b, c-prev)
			prev = c
		}
	}
	b = binary.LittleEndian.AppendUint32(b, crc32.Checksum(b, castagnoli))
	return writeFileSync(path, b)
}

// errDirtyDamaged is returned for a bitmap file that does not check out.
var errDirtyDamaged = errors.New("modification bitmap damaged")

// loadDirty reads a set saved by save. Every change in it counts as
// change 1: older than anything recorded after.
func loadDirty(path string) (*dirtySet, uint64, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, 0, err
	}
	n := len(b)
	if n < len(dirtyMagic)+8+1+4 || !slices.Contains([]string{dirtyMagic, dirtyMagicV2, dirtyMagicV1}, string(b[:len(dirtyMagic)])) ||
		crc32.Checksum(b[:n-4], castagnoli) != binary.LittleEndian.Uint32(b[n-4:]) {
		return nil, 0, fmt.Errorf("%s: %w", path, errDirtyDamaged)
	}
	b = b[len(dirtyMagic) : n-4]
	base := binary.LittleEndian.Uint64(b)
	d := newDirtySet()
	d.lost = b[8] != 0
	b = b[9:]
	next := func() uint64 {
		v, k := binary.Uvarint(b)
		if k <= 0 {
			err = errDirtyDamaged
			return 0
		}
		b = b[k:]
		return v
	}
	files := next()
	for i := uint64(0); i < files && err == nil; i++ {
		ino := next()
		if err != nil || len(b) == 0 {
			return nil, 0, fmt.Errorf("%s: %w", path, errDirtyDamaged)
		}
		flags := b[0]
		b = b[1:]
		f := d.get(ino)
		f.tail = next()
		if flags&1 != 0 {
			f.attr = 1
		}
		if flags&2 != 0 {
			f.whole = 1
		}
		if flags&4 != 0 {
			f.tailTouch = 1
		}
		if flags&8 != 0 {
			f.born = 1
		}
		if flags&16 != 0 {
			f.moved = 1
		}
		if flags&32 != 0 {
			f.blind = 1
		}
		nc := next()
		if nc > uint64(len(b)) {
			err = errDirtyDamaged
			break
		}
		c := uint64(0)
		for j := uint64(0); j < nc && err == nil; j++ {
			c += next()
			if f.chunks == nil {
				f.chunks = map[uint64]uint64{}
			}
			f.chunks[c] = 1
			d.chunks++
		}
	}
	if err != nil || len(b) != 0 {
		return nil, 0, fmt.Errorf("%s: %w", path, errDirtyDamaged)
	}
	return d, base, nil
}
