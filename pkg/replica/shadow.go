package replica

import (
	"io/fs"
	"path"

	"github.com/duet-ha/duet/pkg/wire"
)

// link is one name of an inode: an entry in a parent directory.
type link struct {
	parent uint64
	name   string
}

type snode struct {
	ino      uint64
	gen      uint32 // i_generation when known (genKnown), to tell reused numbers apart
	genKnown bool
	mode     fs.FileMode
	links    []link
	children map[string]uint64 // directories only
}

// shadow is the primary's picture of the replica's namespace, keyed by the
// primary's inode numbers: what the peer has once every batch sent so far
// is applied. Capture reports inodes; the shadow turns them into the paths
// the peer knows, and a directory's changes into renames, links, creates
// and removals by comparing its entries with the shadow's.
type shadow struct {
	root  uint64
	nodes map[uint64]*snode
}

// newShadow builds the shadow from a pre-order scan (the first entry is the
// root, ".").
func newShadow(entries []wire.Entry) *shadow {
	s := &shadow{nodes: make(map[uint64]*snode, len(entries))}
	byPath := make(map[string]uint64, len(entries))
	for _, e := range entries {
		if e.Path == "." {
			s.root = e.Ino
			s.nodes[e.Ino] = &snode{ino: e.Ino, mode: e.Mode, children: map[string]uint64{}}
			byPath["."] = e.Ino
			continue
		}
		dir, name := path.Split(e.Path)
		if dir == "" {
			dir = "."
		} else {
			dir = dir[:len(dir)-1]
		}
		parent, ok := byPath[dir]
		if !ok {
			continue
		}
		s.add(e.Ino, e.Mode, parent, name)
		byPath[e.Path] = e.Ino
	}
	return s
}

// add records that parent/name is inode ino, replacing what the name held.
func (s *shadow) add(ino uint64, mode fs.FileMode, parent uint64, name string) {
	p := s.nodes[parent]
	if p == nil {
		return
	}
	if old, ok := p.children[name]; ok && old != ino {
		s.unlink(parent, name)
	}
	n := s.nodes[ino]
	if n == nil {
		n = &snode{ino: ino, mode: mode}
		if mode.IsDir() {
			n.children = map[string]uint64{}
		}
		s.nodes[ino] = n
	}
	for _, l := range n.links {
		if l.parent == parent && l.name == name {
			return
		}
	}
	n.links = append(n.links, link{parent, name})
	p.children[name] = ino
}

// unlink removes parent/name; an inode left without names is forgotten
// with everything beneath it.
func (s *shadow) unlink(parent uint64, name string) {
	p := s.nodes[parent]
	if p == nil {
		return
	}
	ino, ok := p.children[name]
	if !ok {
		return
	}
	delete(p.children, name)
	n := s.nodes[ino]
	if n == nil {
		return
	}
	for i, l := range n.links {
		if l.parent == parent && l.name == name {
			n.links = append(n.links[:i], n.links[i+1:]...)
			break
		}
	}
	if len(n.links) == 0 {
		s.forget(n)
	}
}

// drop forgets n and all its names, whatever state its parents are in.
func (s *shadow) drop(n *snode) {
	for _, l := range n.links {
		if p := s.nodes[l.parent]; p != nil && p.children[l.name] == n.ino {
			delete(p.children, l.name)
		}
	}
	n.links = nil
	s.forget(n)
}

func (s *shadow) forget(n *snode) {
	// Children first, while n can still be found as their parent.
	for name := range n.children {
		s.unlink(n.ino, name)
	}
	delete(s.nodes, n.ino)
}

// move renames the link from → (parent, name).
func (s *shadow) move(ino uint64, from link, parent uint64, name string) {
	n := s.nodes[ino]
	if n == nil {
		return
	}
	if p := s.nodes[parent]; p != nil {
		if old, ok := p.children[name]; ok && old != ino {
			s.unlink(parent, name)
		}
	}
	if fp := s.nodes[from.parent]; fp != nil && fp.children[from.name] == ino {
		delete(fp.children, from.name)
	}
	for i, l := range n.links {
		if l == from {
			n.links = append(n.links[:i], n.links[i+1:]...)
			break
		}
	}
	n.links = append(n.links, link{parent, name})
	if p := s.nodes[parent]; p != nil {
		p.children[name] = ino
	}
}

// path returns the replica path of ino through its first name, "." for the
// root, and false when the inode is not in the tree.
func (s *shadow) path(ino uint64) (string, bool) {
	var parts []string
	for depth := 0; ino != s.root; depth++ {
		n := s.nodes[ino]
		if n == nil || len(n.links) == 0 || depth > 4096 {
			return "", false
		}
		parts = append(parts, n.links[0].name)
		ino = n.links[0].parent
	}
	if len(parts) == 0 {
		return ".", true
	}
	for i, j := 0, len(parts)-1; i < j; i, j = i+1, j-1 {
		parts[i], parts[j] = parts[j], parts[i]
	}
	return path.Join(parts...), true
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
		n := s.nodes[ino]
		if n == nil || len(n.links) == 0 {
			return 1 << 20
		}
		ino = n.links[0].parent
		d++
	}
	return d
}
