package replica

import (
	"hash/maphash"
	"io/fs"
	"math"
	"path"
	"runtime"
	"slices"
	"strings"
	"unsafe"

	"github.com/duet-ha/duet/pkg/wire"
)

// link is one name of an inode: an entry in a parent directory.
type link struct {
	parent uint64
	name   string
}

// snode is one inode of the shadow as its callers see it: a copy, read
// with shadow.node. Its names are read with shadow.names (the first one
// is the one the peer is told).
type snode struct {
	ino      uint64
	mode     fs.FileMode
	gen      uint32 // i_generation when known (genKnown), to tell reused numbers apart
	genKnown bool
}

// shadow is the primary's picture of the replica's namespace, keyed by the
// primary's inode numbers: what the peer has once every batch sent so far
// is applied. Capture reports inodes; the shadow turns them into the paths
// the peer knows, and a directory's changes into renames, links, creates
// and removals by comparing its entries with the shadow's.
//
// It holds a node per file of the tree for as long as the primary runs,
// so it is laid out to cost little and to hold no Go pointer per file (the
// collector then neither scans nor marks it): a node is a 28-byte record
// in one slice (recs), its first name bytes in one arena, and two open
// addressing tables of record indexes find a node by its number (byIno)
// and a directory's entry by its name (byName). A directory's entries
// by first name are a list threaded through the records (next, prev), so
// a directory can be listed and an entry removed without a map per
// directory. Only what few files have (more names, the entries of those
// names, big directories) is in maps. Records, tables and names are in
// regions (offheap.go): outside the Go heap once they are large.
type shadow struct {
	root uint64
	mem  *shadowMem
	// recs[0] is unused: index 0 means "none" in the tables and lists. A
	// view of mem.recs: its capacity is the region's.
	recs     []nodeRec
	free     uint32 // the first free record, chained through next
	live     int    // records in use
	byIno    itab
	byName   itab
	arena    []byte // the first names, at nodeRec.off: a view of mem.arena
	garbage  int    // bytes of arena no record uses
	dirs     map[uint64]dirList
	more     map[uint64][]link // an inode's names after its first, in order
	moreKids map[uint64]map[string]uint64
	// hi holds, by record index, the high halves of the inode numbers of
	// the records flagged recWide: the inode's in the upper 32 bits, its
	// first name's directory's in the lower. A view of mem.hi as long as
	// recs' capacity, nil until a record needs it.
	hi   []uint64
	seed maphash.Seed
	// big are the directories found to hold bigAt entries or more when
	// read whole. A pass does not read them to find what changed in them:
	// it looks up the names of the inodes whose records it holds (see
	// locate). Once big a directory stays so while it exists: reading it
	// whole again would not see the changes that, while it was big, only
	// its inodes' records told of.
	big map[uint64]bool
	// dead numbers the nodes of dead inodes whose number was taken again
	// (rekey), from deadBase up.
	dead  uint64
	bigAt int
}

// nodeRec is a node of the shadow, 28 bytes and no pointer. Its first
// name is (parent, the arena's bytes at off); the name is an entry of
// the parent directory (found in byName and listed from dirs) when
// recAttached is set: a name whose directory is not in the shadow is kept
// without one, as the peer's path of the inode. The inode numbers are
// held by their low halves: few filesystems give numbers of more than
// 32 bits, and a record that holds one has recWide set and its high
// halves in shadow.hi (see inoOf, parentOf): 8 bytes more a record, for
// every record once one needs them (XFS puts the allocation group in the
// high bits, past its first terabytes, and on such a filesystem most
// numbers are wide). Only the mode's type is kept: a pass asks nothing
// else.
type nodeRec struct {
	ino, parent uint32
	off         uint32 // the first name's offset in the arena
	nlen        uint16 // and its length; 0: no name
	flags       uint8
	typ         uint8 // the mode's type: an index of modeTypes
	gen         uint32
	next, prev  uint32 // the parent's other entries by first name; next chains free records
}

// A record's size is what a million files cost: 28 MB. This fails to
// compile when a change to nodeRec changes it.
var _ = [1]struct{}{}[unsafe.Sizeof(nodeRec{})-28]

const (
	recUsed     = 1 << 0
	recGenKnown = 1 << 1
	recAttached = 1 << 2
	recWide     = 1 << 3 // an inode number of more than 32 bits: see shadow.hi
)

func (r *nodeRec) nameLen() int     { return int(r.nlen) }
func (r *nodeRec) nameOff() int     { return int(r.off) }
func (r *nodeRec) has(f uint8) bool { return r.flags&f != 0 }
func (r *nodeRec) set(f uint8, on bool) {
	if on {
		r.flags |= f
	} else {
		r.flags &^= f
	}
}

// modeTypes are the types a record's typ stands for.
var modeTypes = [...]fs.FileMode{0, fs.ModeDir, fs.ModeSymlink, fs.ModeNamedPipe, fs.ModeSocket,
	fs.ModeDevice, fs.ModeDevice | fs.ModeCharDevice, fs.ModeIrregular}

// typeCode is the index in modeTypes of mode's type; a type not listed
// (none that fstree gives) is irregular.
func typeCode(mode fs.FileMode) uint8 {
	t := mode.Type()
	for k, m := range modeTypes {
		if m == t {
			return uint8(k)
		}
	}
	return uint8(len(modeTypes) - 1)
}

// inoOf is record i's inode number.
func (s *shadow) inoOf(i uint32) uint64 {
	r := &s.recs[i]
	if r.flags&recWide == 0 {
		return uint64(r.ino)
	}
	return uint64(r.ino) | s.hi[i]&^0xffffffff
}

// parentOf is the directory of record i's first name.
func (s *shadow) parentOf(i uint32) uint64 {
	r := &s.recs[i]
	if r.flags&recWide == 0 {
		return uint64(r.parent)
	}
	return uint64(r.parent) | s.hi[i]<<32
}

// inoIs says whether record i is inode ino.
func (s *shadow) inoIs(i uint32, ino uint64) bool {
	r := &s.recs[i]
	if r.ino != uint32(ino) {
		return false
	}
	if r.flags&recWide == 0 {
		return ino>>32 == 0
	}
	return s.inoOf(i) == ino
}

// growHi makes hi as long as recs' capacity, keeping what it holds.
func (s *shadow) growHi() {
	s.mem.hi.resize(cap(s.recs) * 8)
	s.hi = regionSlice[uint64](&s.mem.hi)
}

// setIDs gives record i its inode number and its first name's directory.
func (s *shadow) setIDs(i uint32, ino, parent uint64) {
	r := &s.recs[i]
	r.ino, r.parent = uint32(ino), uint32(parent)
	if hi := ino&^0xffffffff | parent>>32; hi != 0 {
		if s.hi == nil {
			s.growHi()
		}
		r.flags |= recWide
		s.hi[i] = hi
	} else if r.flags&recWide != 0 {
		r.flags &^= recWide
		s.hi[i] = 0
	}
}

// shadowMem is the memory of a shadow's records, tables and names.
type shadowMem struct{ recs, ino, name, arena, hi region }

func (m *shadowMem) free() {
	m.recs.free()
	m.hi.free()
	m.ino.free()
	m.name.free()
	m.arena.free()
}

// mappedBytes is the size of the shadow's regions mapped outside the Go
// heap.
func (s *shadow) mappedBytes() int {
	n := 0
	for _, r := range []*region{&s.mem.recs, &s.mem.ino, &s.mem.name, &s.mem.arena, &s.mem.hi} {
		if r.mapped {
			n += len(r.b)
		}
	}
	return n
}

// regionBytes is the size of all the shadow's regions, on the heap or
// mapped: its records, tables and names (not the maps of the few).
func (s *shadow) regionBytes() int {
	return len(s.mem.recs.b) + len(s.mem.ino.b) + len(s.mem.name.b) + len(s.mem.arena.b) + len(s.mem.hi.b)
}

// dirList is a directory's entries by first name: the list's head and
// its length.
type dirList struct{ head, n uint32 }

// bigDirEntries is where a directory becomes big (shadow.big). A pass
// that reads a directory whole costs in proportion to its entries (0.6 ms
// at 1,000, 65 ms at 100,000: BenchmarkHugeDirCreate), one that places a
// new inode about 0.15 ms whatever the size. Below it reading stays: a
// tree with no big directory is replicated as before, and places no inode
// (records of inodes outside the tree would each cost a lookup).
const bigDirEntries = 1000

// emptyShadow is a shadow with room for about n nodes.
func emptyShadow(n int) *shadow {
	s := &shadow{mem: &shadowMem{}, dirs: map[uint64]dirList{}, more: map[uint64][]link{},
		moreKids: map[uint64]map[string]uint64{}, big: map[uint64]bool{}, bigAt: bigDirEntries, seed: maphash.MakeSeed()}
	// The regions' memory goes with the shadow: nothing else holds it.
	runtime.AddCleanup(s, func(m *shadowMem) { m.free() }, s.mem)
	s.mem.recs.resize((n + 1) * int(unsafe.Sizeof(nodeRec{})))
	s.recs = regionSlice[nodeRec](&s.mem.recs)[:1]
	s.byIno.init(n, &s.mem.ino, func(i uint32) uint64 { return inoHash(s.inoOf(i)) })
	s.byName.init(n, &s.mem.name, func(i uint32) uint64 { return s.bytesHash(s.parentOf(i), s.nameBytes(&s.recs[i])) })
	s.mem.arena.resize(max(n*8, 64))
	s.arena = regionSlice[byte](&s.mem.arena)[:0]
	return s
}

// markBig records that directory ino is big if it holds enough entries.
// Only a reading of the whole directory may make it big: it saw every
// change made until then, and those made after come with records of
// their inodes (see locate).
func (s *shadow) markBig(ino uint64) {
	if s.childCount(ino) >= s.bigAt {
		s.big[ino] = true
	}
}

// newShadow builds the shadow from a pre-order scan (the first entry is the
// root, "."). An entry whose directory is not listed before it is left
// out.
func newShadow(entries []wire.Entry) *shadow {
	sb := newShadowBuilder(len(entries))
	for i := range entries {
		sb.add(&entries[i])
	}
	return sb.done()
}

// shadowBuilder builds a shadow from a pre-order scan one entry at a
// time, as newShadow does: a full sync builds it while it compares, and
// lets go of the entries it has added meanwhile.
type shadowBuilder struct {
	s *shadow
	// The directories from the root down to the entry in hand: in a
	// pre-order scan, an entry's directory is one of them.
	up []openDir
}

type openDir struct {
	path string
	ino  uint64
}

// newShadowBuilder starts an empty shadow sized for about n entries.
func newShadowBuilder(n int) *shadowBuilder {
	return &shadowBuilder{s: emptyShadow(n)}
}

// add adds the next entry of the scan.
func (sb *shadowBuilder) add(e *wire.Entry) {
	s := sb.s
	if e.Path == "." {
		s.root = e.Ino
		s.newNode(e.Ino, e.Mode)
		if e.Flags&wire.EntryGen != 0 {
			s.setGen(e.Ino, e.Gen)
		}
		sb.up = append(sb.up[:0], openDir{".", e.Ino})
		return
	}
	dir, name := path.Split(e.Path)
	if dir == "" {
		dir = "."
	} else {
		dir = dir[:len(dir)-1]
	}
	for len(sb.up) > 0 && sb.up[len(sb.up)-1].path != dir {
		sb.up = sb.up[:len(sb.up)-1]
	}
	if len(sb.up) == 0 {
		return
	}
	s.add(e.Ino, e.Mode, sb.up[len(sb.up)-1].ino, name)
	if e.Flags&wire.EntryGen != 0 {
		s.setGen(e.Ino, e.Gen)
	}
	if e.Mode.IsDir() {
		// Its own copy of the path: a slice of it would keep the
		// whole scanned path alive.
		sb.up = append(sb.up, openDir{strings.Clone(e.Path), e.Ino})
	}
}

// done returns the shadow, its big directories marked.
func (sb *shadowBuilder) done() *shadow {
	for ino := range sb.s.dirs {
		sb.s.markBig(ino)
	}
	sb.up = nil
	return sb.s
}

// --- records, names, tables ---

// find is the record of ino, 0 if none.
func (s *shadow) find(ino uint64) uint32 {
	return s.byIno.find(inoHash(ino), func(i uint32) bool { return s.inoIs(i, ino) })
}

// findName is the record attached as parent/name, 0 if none.
func (s *shadow) findName(parent uint64, name string) uint32 {
	return s.byName.find(s.nameHash(parent, name), func(i uint32) bool {
		return s.parentOf(i) == parent && string(s.nameBytes(&s.recs[i])) == name
	})
}

func (s *shadow) nameBytes(r *nodeRec) []byte {
	off := r.nameOff()
	return s.arena[off : off+r.nameLen()]
}

func (s *shadow) firstLink(i uint32) link {
	r := &s.recs[i]
	if r.nameLen() == 0 {
		return link{}
	}
	return link{s.parentOf(i), string(s.nameBytes(r))}
}

const golden = 0x9e3779b97f4a7c15

func inoHash(ino uint64) uint64 { return ino * golden }

func (s *shadow) nameHash(parent uint64, name string) uint64 {
	return (maphash.String(s.seed, name) ^ parent) * golden
}

// bytesHash is nameHash of a name held as bytes: maphash gives a string
// and its bytes the same hash.
func (s *shadow) bytesHash(parent uint64, name []byte) uint64 {
	return (maphash.Bytes(s.seed, name) ^ parent) * golden
}

// newNode makes the record of a new inode, without names.
func (s *shadow) newNode(ino uint64, mode fs.FileMode) uint32 {
	i := s.free
	if i != 0 {
		s.free = s.recs[i].next
	} else {
		n := len(s.recs)
		if n == cap(s.recs) {
			s.mem.recs.resize(2 * n * int(unsafe.Sizeof(nodeRec{})))
			s.recs = regionSlice[nodeRec](&s.mem.recs)
			if s.hi != nil {
				s.growHi()
			}
		}
		s.recs = s.recs[:n+1]
		i = uint32(n)
	}
	s.recs[i] = nodeRec{typ: typeCode(mode), flags: recUsed}
	s.setIDs(i, ino, 0)
	s.live++
	s.byIno.insert(i)
	if mode.IsDir() {
		s.dirs[ino] = dirList{}
	}
	return i
}

// setFirst gives record i the first name l, not attached.
func (s *shadow) setFirst(i uint32, l link) {
	r := &s.recs[i]
	s.garbage += r.nameLen()
	r.off, r.nlen = 0, 0
	s.setIDs(i, s.inoOf(i), 0)
	if l.name == "" {
		return
	}
	if len(l.name) > 0xffff {
		panic("replica: a name longer than 64 KiB") // NAME_MAX is 255
	}
	off := len(s.arena)
	if off+len(l.name) > math.MaxUint32 {
		// About 300 million names of 14 bytes.
		panic("replica: the shadow's names take more than 4 GiB")
	}
	if off+len(l.name) > cap(s.arena) {
		s.mem.arena.resize(min(2*(off+len(l.name)), math.MaxUint32))
		s.arena = regionSlice[byte](&s.mem.arena)[:off]
	}
	s.arena = append(s.arena, l.name...) // within its capacity: in the region
	r = &s.recs[i]
	r.off, r.nlen = uint32(off), uint16(len(l.name))
	s.setIDs(i, s.inoOf(i), l.parent)
	s.compact()
}

// compactMin is the garbage the arena holds before it may be compacted
// (a variable for the tests).
var compactMin = 1 << 16

// compact rewrites the arena without the names no record uses, once
// they are more than half of it.
func (s *shadow) compact() {
	if s.garbage < compactMin || s.garbage*2 < len(s.arena) {
		return
	}
	var nr region
	nr.resize(max((len(s.arena)-s.garbage)*5/4, 64))
	arena := regionSlice[byte](&nr)[:0]
	for i := 1; i < len(s.recs); i++ {
		r := &s.recs[i]
		if !r.has(recUsed) || r.nameLen() == 0 {
			continue
		}
		off := len(arena)
		arena = append(arena, s.nameBytes(r)...) // fits: the live names are less
		r.off = uint32(off)
	}
	s.mem.arena.free()
	s.mem.arena = nr
	s.arena, s.garbage = arena, 0
}

// attach makes record i's first name an entry of its directory.
func (s *shadow) attach(i uint32) {
	r := &s.recs[i]
	if r.has(recAttached) || r.nameLen() == 0 {
		return
	}
	r.set(recAttached, true)
	parent := s.parentOf(i)
	d := s.dirs[parent]
	r.prev, r.next = 0, d.head
	if d.head != 0 {
		s.recs[d.head].prev = i
	}
	d.head = i
	d.n++
	s.dirs[parent] = d
	s.byName.insert(i)
}

// detach takes record i's first name out of its directory's entries; the
// record keeps the name.
func (s *shadow) detach(i uint32) {
	r := &s.recs[i]
	if !r.has(recAttached) {
		return
	}
	s.byName.remove(i)
	parent := s.parentOf(i)
	d := s.dirs[parent]
	if r.prev != 0 {
		s.recs[r.prev].next = r.next
	} else {
		d.head = r.next
	}
	if r.next != 0 {
		s.recs[r.next].prev = r.prev
	}
	d.n--
	if _, ok := s.dirs[parent]; ok {
		s.dirs[parent] = d
	}
	r.prev, r.next = 0, 0
	r.set(recAttached, false)
}

// freeNode returns record i, already detached and without names.
func (s *shadow) freeNode(i uint32) {
	s.byIno.remove(i)
	r := &s.recs[i]
	s.garbage += r.nameLen()
	if r.flags&recWide != 0 {
		s.hi[i] = 0
	}
	*r = nodeRec{next: s.free}
	s.free = i
	s.live--
}

// --- what the builder asks ---

// nodeCount is how many inodes the shadow holds.
func (s *shadow) nodeCount() int { return s.live }

// has tells whether inode ino is in the shadow.
func (s *shadow) has(ino uint64) bool { return s.find(ino) != 0 }

// node is a copy of inode ino's node.
func (s *shadow) node(ino uint64) (snode, bool) {
	i := s.find(ino)
	if i == 0 {
		return snode{}, false
	}
	r := &s.recs[i]
	return snode{ino: ino, mode: modeTypes[r.typ], gen: r.gen, genKnown: r.has(recGenKnown)}, true
}

// setGen records inode ino's generation.
func (s *shadow) setGen(ino uint64, gen uint32) {
	if i := s.find(ino); i != 0 {
		s.recs[i].gen = gen
		s.recs[i].set(recGenKnown, true)
	}
}

// names lists the names of inode ino, the first one first.
func (s *shadow) names(ino uint64) []link {
	i := s.find(ino)
	if i == 0 || s.recs[i].nameLen() == 0 {
		return nil
	}
	return append([]link{s.firstLink(i)}, s.more[ino]...)
}

// nameCount is len(s.names(ino)).
func (s *shadow) nameCount(ino uint64) int {
	i := s.find(ino)
	if i == 0 || s.recs[i].nameLen() == 0 {
		return 0
	}
	return 1 + len(s.more[ino])
}

// childCount is the number of entries of directory ino.
func (s *shadow) childCount(ino uint64) int {
	return int(s.dirs[ino].n) + len(s.moreKids[ino])
}

// eachChild calls fn with each entry of directory ino, until it returns
// false. fn must not change the shadow.
func (s *shadow) eachChild(ino uint64, fn func(name string, child uint64) bool) {
	for i := s.dirs[ino].head; i != 0; i = s.recs[i].next {
		if !fn(string(s.nameBytes(&s.recs[i])), s.inoOf(i)) {
			return
		}
	}
	for name, child := range s.moreKids[ino] {
		if !fn(name, child) {
			return
		}
	}
}

// child is the inode named name in directory parent.
func (s *shadow) child(parent uint64, name string) (uint64, bool) {
	if i := s.findName(parent, name); i != 0 {
		return s.inoOf(i), true
	}
	ino, ok := s.moreKids[parent][name]
	return ino, ok
}

// delChild removes the entry parent/name if it names ino.
func (s *shadow) delChild(parent uint64, name string, ino uint64) {
	if i := s.findName(parent, name); i != 0 {
		if s.inoIs(i, ino) {
			s.detach(i)
		}
		return
	}
	if cur, ok := s.moreKids[parent][name]; ok && cur == ino {
		s.dropMoreKid(parent, name)
	}
}

// dropMoreKid removes parent/name from the entries of second names.
func (s *shadow) dropMoreKid(parent uint64, name string) {
	if m := s.moreKids[parent]; m != nil {
		delete(m, name)
		if len(m) == 0 {
			delete(s.moreKids, parent)
		}
	}
}

// setChild records parent/name as ino, one of ino's names, replacing
// the entry the name had.
func (s *shadow) setChild(parent uint64, name string, ino uint64) {
	if i := s.findName(parent, name); i != 0 {
		if s.inoIs(i, ino) {
			return
		}
		s.detach(i)
	}
	s.dropMoreKid(parent, name)
	if _, ok := s.dirs[parent]; !ok {
		s.dirs[parent] = dirList{}
	}
	i := s.find(ino)
	if i != 0 && s.recs[i].nameLen() != 0 && s.parentOf(i) == parent && string(s.nameBytes(&s.recs[i])) == name {
		s.attach(i)
		return
	}
	m := s.moreKids[parent]
	if m == nil {
		m = map[string]uint64{}
		s.moreKids[parent] = m
	}
	m[strings.Clone(name)] = ino
}

// addName gives inode i one more name, last.
func (s *shadow) addName(i uint32, l link) {
	if s.recs[i].nameLen() == 0 {
		s.setFirst(i, l)
		return
	}
	ino := s.inoOf(i)
	s.more[ino] = append(s.more[ino], link{l.parent, strings.Clone(l.name)})
}

// removeName takes name l from inode i; the next one becomes the first.
func (s *shadow) removeName(i uint32, l link) {
	ino := s.inoOf(i)
	more := s.more[ino]
	if s.recs[i].nameLen() != 0 && s.firstLink(i) == l {
		s.detach(i)
		s.setFirst(i, link{})
		if len(more) == 0 {
			return
		}
		next := more[0]
		more = more[1:]
		s.setFirst(i, next)
		// The entry of that name, if it had one, moves to the record.
		if cur, ok := s.moreKids[next.parent][next.name]; ok && cur == ino {
			s.dropMoreKid(next.parent, next.name)
			s.attach(i)
		}
	} else if j := slices.Index(more, l); j >= 0 {
		more = slices.Delete(more, j, j+1)
	} else {
		return
	}
	if len(more) == 0 {
		delete(s.more, ino)
	} else {
		s.more[ino] = more
	}
}

// add records that parent/name is inode ino, replacing what the name held.
func (s *shadow) add(ino uint64, mode fs.FileMode, parent uint64, name string) {
	if !s.has(parent) {
		return
	}
	if old, ok := s.child(parent, name); ok && old != ino {
		s.unlink(parent, name)
	}
	i := s.find(ino)
	if i == 0 {
		i = s.newNode(ino, mode)
	}
	l := link{parent, name}
	if s.firstLink(i) == l || slices.Contains(s.more[ino], l) {
		return
	}
	s.addName(i, l)
	s.setChild(parent, name, ino)
}

// unlink removes parent/name; an inode left without names is forgotten
// with everything beneath it.
func (s *shadow) unlink(parent uint64, name string) {
	if !s.has(parent) {
		return
	}
	ino, ok := s.child(parent, name)
	if !ok {
		return
	}
	s.delChild(parent, name, ino)
	i := s.find(ino)
	if i == 0 {
		return
	}
	s.removeName(i, link{parent, name})
	if s.recs[i].nameLen() == 0 {
		s.forget(ino)
	}
}

// drop forgets inode ino and all its names, whatever state its parents
// are in.
func (s *shadow) drop(ino uint64) {
	i := s.find(ino)
	if i == 0 {
		return
	}
	for _, l := range s.names(ino) {
		if s.has(l.parent) {
			if cur, ok := s.child(l.parent, l.name); ok && cur == ino {
				s.delChild(l.parent, l.name, ino)
			}
		}
	}
	s.detach(i)
	s.setFirst(i, link{})
	delete(s.more, ino)
	s.forget(ino)
}

// forget takes inode ino out of the shadow, its entries first.
func (s *shadow) forget(ino uint64) {
	// Children first, while ino can still be found as their parent:
	// the entries of second names in one go, then the list's.
	if m := s.moreKids[ino]; len(m) > 0 {
		names := make([]string, 0, len(m))
		for name := range m {
			names = append(names, name)
		}
		for _, name := range names {
			s.unlink(ino, name)
		}
	}
	for {
		var name string
		found := false
		s.eachChild(ino, func(n string, _ uint64) bool { name, found = n, true; return false })
		if !found {
			break
		}
		before := s.childCount(ino)
		s.unlink(ino, name)
		if s.childCount(ino) >= before {
			break // cannot happen: unlink removes the entry it finds
		}
	}
	if i := s.find(ino); i != 0 {
		s.detach(i)
		s.freeNode(i)
	}
	delete(s.dirs, ino)
	delete(s.moreKids, ino)
	delete(s.more, ino)
	delete(s.big, ino)
}

// deadBase is where the numbers rekey gives dead inodes begin: above any
// inode number ext4, XFS or btrfs hands out.
const deadBase = 1 << 63

// isDead says whether ino is a number rekey gave a dead inode.
func isDead(ino uint64) bool { return ino >= deadBase }

// rekey gives node ino's names and entries to a new node of a number of
// its own, which it returns (0 if ino is not known), and forgets ino: the
// inode is dead and its number taken again, but what the peer holds under
// its names stays for the passes to reconcile (kept aside, claimed or
// removed like any other node's).
func (s *shadow) rekey(ino uint64) uint64 {
	n, ok := s.node(ino)
	if !ok || ino == s.root {
		return 0
	}
	if s.dead < deadBase {
		s.dead = deadBase
	}
	s.dead++
	s.renumber(ino, n, s.dead)
	return s.dead
}

// renumber moves node ino (n) with its names and entries to number to,
// which the shadow does not hold.
func (s *shadow) renumber(ino uint64, n snode, to uint64) {
	s.newNode(to, n.mode)
	if n.mode.IsDir() {
		kids := map[string]uint64{}
		s.eachChild(ino, func(name string, c uint64) bool { kids[strings.Clone(name)] = c; return true })
		for name, c := range s.moreKids[ino] {
			kids[name] = c
		}
		for name, c := range kids {
			s.move(c, link{ino, name}, to, name)
		}
		if s.big[ino] {
			s.big[to] = true
		}
	}
	for _, l := range s.names(ino) {
		// A name whose entry holds another node is stale: not taken
		// from that node.
		if cur, ok := s.child(l.parent, l.name); ok && cur == ino {
			s.add(to, n.mode, l.parent, l.name)
		}
	}
	if s.has(ino) {
		s.drop(ino)
	}
}

// move renames the link from → (parent, name).
func (s *shadow) move(ino uint64, from link, parent uint64, name string) {
	i := s.find(ino)
	if i == 0 {
		return
	}
	if s.has(parent) {
		if old, ok := s.child(parent, name); ok && old != ino {
			s.unlink(parent, name)
		}
	}
	if s.has(from.parent) {
		if cur, ok := s.child(from.parent, from.name); ok && cur == ino {
			s.delChild(from.parent, from.name, ino)
		}
	}
	// The unlink above may have forgotten ino (a directory moved into
	// itself is not something a pass makes; the old shadow kept a stale
	// node then).
	if i = s.find(ino); i == 0 {
		return
	}
	s.removeName(i, from)
	s.addName(i, link{parent, name})
	if s.has(parent) {
		s.setChild(parent, name, ino)
	}
}

// maxDepth bounds the walk up from an inode to the root (a loop would
// not end): the deepest path the wire takes, of one-byte names.
const maxDepth = wire.MaxPath / 2

// path returns the replica path of ino through its first name, "." for the
// root, and false when the inode is not in the tree.
func (s *shadow) path(ino uint64) (string, bool) {
	// The records from ino up, then the path written from its end.
	var stack [32]uint32
	recs := stack[:0]
	size := -1
	for depth := 0; ino != s.root; depth++ {
		i := s.find(ino)
		if i == 0 || s.recs[i].nameLen() == 0 || depth > maxDepth {
			return "", false
		}
		recs = append(recs, i)
		size += s.recs[i].nameLen() + 1
		ino = s.parentOf(i)
	}
	if len(recs) == 0 {
		return ".", true
	}
	buf := make([]byte, size)
	at := 0
	for k := len(recs) - 1; k >= 0; k-- {
		at += copy(buf[at:], s.nameBytes(&s.recs[recs[k]]))
		if k > 0 {
			buf[at] = '/'
			at++
		}
	}
	return string(buf), true
}

// pathIs says whether p (a replica path, "." for the root) is the path of
// ino's first name, as path would give it, without building that path.
func (s *shadow) pathIs(ino uint64, p string) bool {
	if ino == s.root {
		return p == "."
	}
	for depth := 0; depth <= maxDepth; depth++ {
		i := s.find(ino)
		if i == 0 || s.recs[i].nameLen() == 0 {
			return false
		}
		name := s.nameBytes(&s.recs[i])
		if len(p) < len(name) || p[len(p)-len(name):] != string(name) {
			return false
		}
		p = p[:len(p)-len(name)]
		if ino = s.parentOf(i); ino == s.root {
			return p == ""
		}
		if len(p) == 0 || p[len(p)-1] != '/' {
			return false
		}
		p = p[:len(p)-1]
	}
	return false
}

// hasPath says whether p is the path of one of ino's names: pathIs, and
// for a hard-linked file its other names.
func (s *shadow) hasPath(ino uint64, p string) bool {
	if s.pathIs(ino, p) {
		return true
	}
	for _, l := range s.more[ino] {
		if lp, ok := s.linkPath(l); ok && lp == p {
			return true
		}
	}
	return false
}

// linkPath is the replica path of one name.
func (s *shadow) linkPath(l link) (string, bool) {
	dir, ok := s.path(l.parent)
	if !ok {
		return "", false
	}
	if dir == "." {
		return l.name, true
	}
	return dir + "/" + l.name, true
}

// depth is the number of names between ino and the root.
func (s *shadow) depth(ino uint64) int {
	d := 0
	for ino != s.root && d <= 4096 {
		i := s.find(ino)
		if i == 0 || s.recs[i].nameLen() == 0 {
			return 1 << 20
		}
		ino = s.parentOf(i)
		d++
	}
	return d
}

// itab is an open addressing table of record indexes (linear probing,
// deletion by moving entries back), at most three quarters full; hash
// gives a record's hash.
type itab struct {
	slots []uint32 // a view of mem
	mem   *region
	n     int
	shift uint
	hash  func(uint32) uint64
}

func (t *itab) init(n int, mem *region, hash func(uint32) uint64) {
	t.hash, t.mem = hash, mem
	size := 16
	for size*3 < n*4 {
		size *= 2
	}
	t.setSize(size)
}

// setSize gives the table new, empty slots.
func (t *itab) setSize(size int) {
	t.mem.free()
	t.mem.resize(size * 4)
	t.slots = regionSlice[uint32](t.mem)[:size]
	bits := uint(0)
	for 1<<bits < size {
		bits++
	}
	t.shift = 64 - bits
}

func (t *itab) mask() uint64 { return uint64(len(t.slots) - 1) }

// find is the index in the table whose record is (hash h and) is, 0 if
// none.
func (t *itab) find(h uint64, is func(uint32) bool) uint32 {
	for k := h >> t.shift; ; k = (k + 1) & t.mask() {
		i := t.slots[k]
		if i == 0 {
			return 0
		}
		if is(i) {
			return i
		}
	}
}

func (t *itab) insert(i uint32) {
	if (t.n+1)*4 > len(t.slots)*3 {
		// The old slots stay mapped until they are put in the new.
		oldMem, old := *t.mem, t.slots
		*t.mem = region{}
		t.setSize(len(old) * 2)
		for _, j := range old {
			if j != 0 {
				t.put(j)
			}
		}
		oldMem.free()
	}
	t.put(i)
	t.n++
}

func (t *itab) put(i uint32) {
	k := t.hash(i) >> t.shift
	for t.slots[k] != 0 {
		k = (k + 1) & t.mask()
	}
	t.slots[k] = i
}

// remove takes record i out of the table; it must be there.
func (t *itab) remove(i uint32) {
	k := t.hash(i) >> t.shift
	for t.slots[k] != i {
		if t.slots[k] == 0 {
			panic("replica: shadow table lost a record")
		}
		k = (k + 1) & t.mask()
	}
	// Move back the entries of the run after k that hash at or before it.
	hole := k
	for j := (k + 1) & t.mask(); t.slots[j] != 0; j = (j + 1) & t.mask() {
		home := t.hash(t.slots[j]) >> t.shift
		// Can the entry at j move to hole? Only if its home is not in
		// (hole, j], cyclically.
		if (j > hole && (home <= hole || home > j)) || (j < hole && home <= hole && home > j) {
			t.slots[hole] = t.slots[j]
			hole = j
		}
	}
	t.slots[hole] = 0
	t.n--
}
