package nfsd

import (
	"fmt"
	"sort"
)

// rootID is the file ID of the export's root. It is a constant so that the
// root handle is the same on every server of the export, whatever the
// index holds.
const rootID uint64 = 1

// node is one file ID's place in the export.
type node struct {
	parent   uint64
	name     string
	children map[string]uint64
}

// tree maps file IDs to their place in the export (parent ID and name) and
// back. It is the in-memory state the index log replays into: keyed by
// parent and name rather than by full path, a rename of a directory is one
// change however many files it holds. It knows nothing of the filesystem.
type tree struct {
	nodes map[uint64]*node
}

func newTree() *tree {
	return &tree{nodes: map[uint64]*node{rootID: {}}}
}

// child returns the ID named name in the directory parent.
func (t *tree) child(parent uint64, name string) (uint64, bool) {
	p := t.nodes[parent]
	if p == nil {
		return 0, false
	}
	id, ok := p.children[name]
	return id, ok
}

// walk resolves as many leading components of comps as the tree knows:
// ids[i] is the ID of comps[:i+1].
func (t *tree) walk(comps []string) []uint64 {
	ids := make([]uint64, 0, len(comps))
	at := rootID
	for _, c := range comps {
		id, ok := t.child(at, c)
		if !ok {
			break
		}
		ids = append(ids, id)
		at = id
	}
	return ids
}

// path returns the components of id's place, nil for the root.
func (t *tree) path(id uint64) ([]string, bool) {
	var rev []string
	for steps := 0; id != rootID; steps++ {
		n := t.nodes[id]
		if n == nil || steps > len(t.nodes) {
			return nil, false
		}
		rev = append(rev, n.name)
		id = n.parent
	}
	comps := make([]string, len(rev))
	for i, c := range rev {
		comps[len(rev)-1-i] = c
	}
	return comps, true
}

// set places id at name in parent. Whatever ID held that name before is
// dropped with everything under it: a name holds one object, and the old
// object's handle must not resolve to the new one.
func (t *tree) set(id, parent uint64, name string) error {
	if id == rootID || id == 0 {
		return fmt.Errorf("file ID %#x is reserved", id)
	}
	p := t.nodes[parent]
	if p == nil {
		return fmt.Errorf("placing %#x at %q: parent %#x unknown", id, name, parent)
	}
	// A directory moved under itself would make path loop: the kernel
	// refuses such a rename, so only a damaged log can ask for it.
	for a := parent; a != rootID; a = t.nodes[a].parent {
		if a == id {
			return fmt.Errorf("placing %#x at %q: parent %#x lies under it", id, name, parent)
		}
		if t.nodes[a] == nil {
			break
		}
	}
	if old, ok := p.children[name]; ok && old != id {
		t.del(old)
	}
	n := t.nodes[id]
	if n == nil {
		n = &node{}
		t.nodes[id] = n
	} else if q := t.nodes[n.parent]; q != nil && q.children[n.name] == id {
		delete(q.children, n.name)
	}
	n.parent, n.name = parent, name
	if p.children == nil {
		p.children = map[string]uint64{}
	}
	p.children[name] = id
	return nil
}

// del forgets id and every ID under it.
func (t *tree) del(id uint64) {
	n := t.nodes[id]
	if n == nil || id == rootID {
		return
	}
	if p := t.nodes[n.parent]; p != nil && p.children[n.name] == id {
		delete(p.children, n.name)
	}
	stack := []uint64{id}
	for len(stack) > 0 {
		top := stack[len(stack)-1]
		stack = stack[:len(stack)-1]
		if m := t.nodes[top]; m != nil {
			for _, c := range m.children {
				stack = append(stack, c)
			}
		}
		delete(t.nodes, top)
	}
}

// apply replays one mutation record.
func (t *tree) apply(r record) error {
	switch r.kind {
	case kindSet:
		return t.set(r.id, r.parent, r.name)
	case kindMove:
		return t.set(r.id, r.parent, r.name)
	case kindDel:
		t.del(r.id)
		return nil
	}
	return fmt.Errorf("record kind %d is not a mutation", r.kind)
}

// undo returns the records that put back what a move changed: the moved ID
// at its old name and the ID it replaced at the new one.
func undo(m record) []record {
	out := []record{{kind: kindSet, id: m.id, parent: m.from, name: m.fromName}}
	if m.replaced != 0 {
		out = append(out, record{kind: kindSet, id: m.replaced, parent: m.parent, name: m.name})
	}
	return out
}

// snapshot lists the tree as set records, parents before their children,
// so that replaying them rebuilds it.
func (t *tree) snapshot() []record {
	var out []record
	queue := []uint64{rootID}
	for len(queue) > 0 {
		n := t.nodes[queue[0]]
		parent := queue[0]
		queue = queue[1:]
		names := make([]string, 0, len(n.children))
		for name := range n.children {
			names = append(names, name)
		}
		sort.Strings(names)
		for _, name := range names {
			id := n.children[name]
			out = append(out, record{kind: kindSet, id: id, parent: parent, name: name})
			queue = append(queue, id)
		}
	}
	return out
}
