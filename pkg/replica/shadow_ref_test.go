// The shadow as it was before it was laid out without pointers (a map
// of nodes, a map per directory): the model the shadow is checked
// against in TestShadowMatchesMapModel.

package replica

import (
	"io/fs"
	"path"
	"slices"
	"strings"

	"github.com/duet-ha/duet/pkg/wire"
)

// snode is one inode of the refShadow, 48 bytes: the refShadow holds one per
// file of the tree. Its first name is kept in place; the few inodes with
// more names keep the others in refShadow.more, and directories their
// entries in refShadow.kids.
type refNode struct {
	ino      uint64
	first    link // {0, ""}: no name (the root, or a node being forgotten)
	mode     fs.FileMode
	gen      uint32 // i_generation when known (genKnown), to tell reused numbers apart
	genKnown bool
}

// refShadow is the primary's picture of the replica's namespace, keyed by the
// primary's inode numbers: what the peer has once every batch sent so far
// is applied. Capture reports inodes; the refShadow turns them into the paths
// the peer knows, and a directory's changes into renames, links, creates
// and removals by comparing its entries with the refShadow's.
type refShadow struct {
	root  uint64
	nodes map[uint64]*refNode
	// kids are the entries of each directory, name → inode.
	kids map[uint64]map[string]uint64
	// more are the names of an inode after its first, in order.
	more map[uint64][]link
	// big are the directories found to hold bigAt entries or more when
	// read whole. A pass does not read them to find what changed in them:
	// it looks up the names of the inodes whose records it holds (see
	// locate). Once big a directory stays so while it exists: reading it
	// whole again would not see the changes that, while it was big, only
	// its inodes' records told of.
	big   map[uint64]bool
	bigAt int
}

// markBig records that directory ino is big if it holds enough entries.
// Only a reading of the whole directory may make it big: it saw every
// change made until then, and those made after come with records of
// their inodes (see locate).
func (s *refShadow) markBig(ino uint64) {
	if len(s.kids[ino]) >= s.bigAt {
		s.big[ino] = true
	}
}

// newRefShadow builds the refShadow from a pre-order scan (the first entry is the
// root, "."). An entry whose directory is not listed before it is left
// out.
func newRefShadow(entries []wire.Entry) *refShadow {
	sb := newRefBuilder(len(entries))
	for i := range entries {
		sb.add(&entries[i])
	}
	return sb.done()
}

// refShadowBuilder builds a refShadow from a pre-order scan one entry at a
// time, as newRefShadow does: a full sync builds it while it compares, and
// lets go of the entries it has added meanwhile.
type refShadowBuilder struct {
	s *refShadow
	// The directories from the root down to the entry in hand: in a
	// pre-order scan, an entry's directory is one of them.
	up []refOpenDir
}

type refOpenDir struct {
	path string
	ino  uint64
}

// newRefBuilder starts an empty refShadow sized for about n entries.
func newRefBuilder(n int) *refShadowBuilder {
	return &refShadowBuilder{s: &refShadow{nodes: make(map[uint64]*refNode, n), kids: map[uint64]map[string]uint64{}, more: map[uint64][]link{},
		big: map[uint64]bool{}, bigAt: bigDirEntries}}
}

// add adds the next entry of the scan.
func (sb *refShadowBuilder) add(e *wire.Entry) {
	s := sb.s
	if e.Path == "." {
		s.root = e.Ino
		s.nodes[e.Ino] = &refNode{ino: e.Ino, mode: e.Mode}
		s.kids[e.Ino] = map[string]uint64{}
		sb.up = append(sb.up[:0], refOpenDir{".", e.Ino})
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
	// Its own copy of the name: a slice of the path would keep the
	// whole path alive.
	s.add(e.Ino, e.Mode, sb.up[len(sb.up)-1].ino, strings.Clone(name))
	if e.Mode.IsDir() {
		// Its own copy of the path too, for the same reason.
		sb.up = append(sb.up, refOpenDir{strings.Clone(e.Path), e.Ino})
	}
}

// done returns the refShadow, its big directories marked.
func (sb *refShadowBuilder) done() *refShadow {
	for ino := range sb.s.kids {
		sb.s.markBig(ino)
	}
	sb.up = nil
	return sb.s
}

// names lists the names of n, the first one first.
func (s *refShadow) names(n *refNode) []link {
	if n.first.name == "" {
		return nil
	}
	return append([]link{n.first}, s.more[n.ino]...)
}

// nameCount is len(s.names(n)).
func (s *refShadow) nameCount(n *refNode) int {
	if n.first.name == "" {
		return 0
	}
	return 1 + len(s.more[n.ino])
}

// addName gives n one more name, last.
func (s *refShadow) addName(n *refNode, l link) {
	if n.first.name == "" {
		n.first = l
		return
	}
	s.more[n.ino] = append(s.more[n.ino], l)
}

// removeName takes name l from n; the next one becomes the first.
func (s *refShadow) removeName(n *refNode, l link) {
	more := s.more[n.ino]
	if n.first == l {
		n.first = link{}
		if len(more) == 0 {
			return
		}
		n.first, more = more[0], more[1:]
	} else if i := slices.Index(more, l); i >= 0 {
		more = slices.Delete(more, i, i+1)
	} else {
		return
	}
	if len(more) == 0 {
		delete(s.more, n.ino)
	} else {
		s.more[n.ino] = more
	}
}

// child is the inode named name in directory parent.
func (s *refShadow) child(parent uint64, name string) (uint64, bool) {
	ino, ok := s.kids[parent][name]
	return ino, ok
}

// setChild records parent/name as ino.
func (s *refShadow) setChild(parent uint64, name string, ino uint64) {
	m := s.kids[parent]
	if m == nil {
		m = map[string]uint64{}
		s.kids[parent] = m
	}
	m[name] = ino
}

// add records that parent/name is inode ino, replacing what the name held.
func (s *refShadow) add(ino uint64, mode fs.FileMode, parent uint64, name string) {
	if s.nodes[parent] == nil {
		return
	}
	if old, ok := s.child(parent, name); ok && old != ino {
		s.unlink(parent, name)
	}
	n := s.nodes[ino]
	if n == nil {
		n = &refNode{ino: ino, mode: mode}
		if mode.IsDir() {
			s.kids[ino] = map[string]uint64{}
		}
		s.nodes[ino] = n
	}
	l := link{parent, name}
	if n.first == l || slices.Contains(s.more[ino], l) {
		return
	}
	s.addName(n, l)
	s.setChild(parent, name, ino)
}

// unlink removes parent/name; an inode left without names is forgotten
// with everything beneath it.
func (s *refShadow) unlink(parent uint64, name string) {
	if s.nodes[parent] == nil {
		return
	}
	ino, ok := s.child(parent, name)
	if !ok {
		return
	}
	delete(s.kids[parent], name)
	n := s.nodes[ino]
	if n == nil {
		return
	}
	s.removeName(n, link{parent, name})
	if n.first.name == "" {
		s.forget(n)
	}
}

// drop forgets n and all its names, whatever state its parents are in.
func (s *refShadow) drop(n *refNode) {
	for _, l := range s.names(n) {
		if s.nodes[l.parent] != nil {
			if cur, ok := s.child(l.parent, l.name); ok && cur == n.ino {
				delete(s.kids[l.parent], l.name)
			}
		}
	}
	n.first = link{}
	delete(s.more, n.ino)
	s.forget(n)
}

func (s *refShadow) forget(n *refNode) {
	// Children first, while n can still be found as their parent.
	for name := range s.kids[n.ino] {
		s.unlink(n.ino, name)
	}
	delete(s.nodes, n.ino)
	delete(s.kids, n.ino)
	delete(s.more, n.ino)
	delete(s.big, n.ino)
}

// move renames the link from → (parent, name).
func (s *refShadow) move(ino uint64, from link, parent uint64, name string) {
	n := s.nodes[ino]
	if n == nil {
		return
	}
	if s.nodes[parent] != nil {
		if old, ok := s.child(parent, name); ok && old != ino {
			s.unlink(parent, name)
		}
	}
	if s.nodes[from.parent] != nil {
		if cur, ok := s.child(from.parent, from.name); ok && cur == ino {
			delete(s.kids[from.parent], from.name)
		}
	}
	s.removeName(n, from)
	s.addName(n, link{parent, name})
	if s.nodes[parent] != nil {
		s.setChild(parent, name, ino)
	}
}

// path returns the replica path of ino through its first name, "." for the
// root, and false when the inode is not in the tree.
func (s *refShadow) path(ino uint64) (string, bool) {
	var parts []string
	for depth := 0; ino != s.root; depth++ {
		n := s.nodes[ino]
		if n == nil || n.first.name == "" || depth > 4096 {
			return "", false
		}
		parts = append(parts, n.first.name)
		ino = n.first.parent
	}
	if len(parts) == 0 {
		return ".", true
	}
	for i, j := 0, len(parts)-1; i < j; i, j = i+1, j-1 {
		parts[i], parts[j] = parts[j], parts[i]
	}
	return path.Join(parts...), true
}

// depth is the number of names between ino and the root.
func (s *refShadow) depth(ino uint64) int {
	d := 0
	for ino != s.root && d <= 4096 {
		n := s.nodes[ino]
		if n == nil || n.first.name == "" {
			return 1 << 20
		}
		ino = n.first.parent
		d++
	}
	return d
}
