package replica

import (
	"fmt"
	"io/fs"
	"maps"
	"math/rand"
	"reflect"
	"slices"
	"testing"

	"github.com/duet-ha/duet/pkg/wire"
)

// snapNode is a node and its first name.
type snapNode struct {
	snode
	first link
}

// shadowSnap is what a shadow holds, in maps, to compare two of them.
type shadowSnap struct {
	root  uint64
	nodes map[uint64]snapNode
	kids  map[uint64]map[string]uint64
	more  map[uint64][]link
	big   map[uint64]bool
}

func (s *shadow) snapshot() shadowSnap {
	sn := shadowSnap{root: s.root, nodes: map[uint64]snapNode{}, kids: map[uint64]map[string]uint64{}, more: map[uint64][]link{}, big: maps.Clone(s.big)}
	for i := 1; i < len(s.recs); i++ {
		if r := &s.recs[i]; r.has(recUsed) {
			n, _ := s.node(s.inoOf(uint32(i)))
			sn.nodes[n.ino] = snapNode{n, s.firstLink(uint32(i))}
		}
	}
	for dir := range s.dirs {
		m := map[string]uint64{}
		s.eachChild(dir, func(name string, ino uint64) bool { m[name] = ino; return true })
		sn.kids[dir] = m
	}
	for ino, l := range s.more {
		sn.more[ino] = slices.Clone(l)
	}
	return sn
}

func (s *refShadow) snapshot() shadowSnap {
	sn := shadowSnap{root: s.root, nodes: map[uint64]snapNode{}, kids: map[uint64]map[string]uint64{}, more: map[uint64][]link{}, big: maps.Clone(s.big)}
	for ino, n := range s.nodes {
		// The shadow keeps a mode's type only.
		sn.nodes[ino] = snapNode{snode{ino: n.ino, mode: n.mode.Type(), gen: n.gen, genKnown: n.genKnown}, n.first}
	}
	for dir, m := range s.kids {
		sn.kids[dir] = maps.Clone(m)
	}
	for ino, l := range s.more {
		sn.more[ino] = slices.Clone(l)
	}
	return sn
}

// check verifies the shadow's own structures: every record in use is
// found by its number once, every attached first name by its name, the
// lists hold the attached records of their directory and their lengths
// are right, and the arena's garbage is what no record uses.
func (s *shadow) check() error {
	used, attached, nameBytes := 0, 0, 0
	for i := 1; i < len(s.recs); i++ {
		r := &s.recs[i]
		if !r.has(recUsed) {
			continue
		}
		used++
		nameBytes += r.nameLen()
		ino, parent := s.inoOf(uint32(i)), s.parentOf(uint32(i))
		if s.find(ino) != uint32(i) {
			return fmt.Errorf("record %d (inode %d) not found by its number", i, ino)
		}
		if wide := ino>>32 != 0 || parent>>32 != 0; wide != r.has(recWide) {
			return fmt.Errorf("record %d (inode %d, parent %d) flagged wide: %v", i, ino, parent, r.has(recWide))
		}
		if r.has(recAttached) {
			attached++
			if s.findName(parent, string(s.nameBytes(r))) != uint32(i) {
				return fmt.Errorf("record %d (%d/%s) not found by its name", i, parent, s.nameBytes(r))
			}
		}
	}
	for i, hi := range s.hi {
		if hi != 0 && (i >= len(s.recs) || !s.recs[i].has(recWide)) {
			return fmt.Errorf("record %d has high halves and is not flagged wide", i)
		}
	}
	if used != s.live || s.byIno.n != used || s.byName.n != attached {
		return fmt.Errorf("%d records in use (live %d, by number %d), %d attached (by name %d)", used, s.live, s.byIno.n, attached, s.byName.n)
	}
	if nameBytes+s.garbage != len(s.arena) {
		return fmt.Errorf("names %d bytes + garbage %d != arena %d", nameBytes, s.garbage, len(s.arena))
	}
	listed := 0
	for dir, d := range s.dirs {
		n, prev := uint32(0), uint32(0)
		for i := d.head; i != 0; i = s.recs[i].next {
			r := &s.recs[i]
			if !r.has(recAttached) || s.parentOf(i) != dir || r.prev != prev {
				return fmt.Errorf("directory %d lists record %d (parent %d, attached %v, prev %d want %d)", dir, i, s.parentOf(i), r.has(recAttached), r.prev, prev)
			}
			prev = i
			n++
		}
		if n != d.n {
			return fmt.Errorf("directory %d lists %d, counts %d", dir, n, d.n)
		}
		listed += int(n)
	}
	if listed != attached {
		return fmt.Errorf("%d attached, %d listed", attached, listed)
	}
	return nil
}

// TestShadowMatchesMapModel runs random changes (names made, removed,
// moved, linked, inodes dropped, numbers reused) on the shadow and on the
// map shadow it replaced, and compares what they hold and answer after
// each. Few inode numbers and names, so that collisions, hard links,
// subtrees forgotten and names left without a directory come often; the
// arena is compacted at every chance.
func TestShadowMatchesMapModel(t *testing.T) {
	for _, mapped := range []bool{false, true} {
		t.Run(fmt.Sprintf("mapped=%v", mapped), func(t *testing.T) {
			defer func(m, a int) { compactMin, mapAt = m, a }(compactMin, mapAt)
			compactMin = 0
			if mapped {
				mapAt = 0 // every region outside the heap
			}
			shadowModelRuns(t)
		})
	}
}

func shadowModelRuns(t *testing.T) {
	const inos, steps = 24, 400
	names := []string{"a", "b", "c", "dd", "long-name-of-a-file", ".x"}
	seeds := 300
	if testing.Short() {
		seeds = 50
	}
	for seed := range seeds {
		rng := rand.New(rand.NewSource(int64(seed)))
		// The model's inode numbers 1..inos are given numbers of more
		// than 32 bits in two seeds of three: with low halves all
		// different, then with low halves shared by several.
		num := func(k uint64) uint64 {
			switch {
			case k == 0 || seed%3 == 0:
				return k
			case seed%3 == 1:
				return k | (k%3)<<32
			default:
				return (k%4 + 1) | (k/4)<<32
			}
		}
		kinds := map[uint64]fs.FileMode{}
		for k := uint64(1); k <= inos; k++ {
			kinds[num(k)] = 0o644
			if k%3 == 2 {
				kinds[num(k)] = fs.ModeDir | 0o755
			}
		}
		mode := func(ino uint64) fs.FileMode { return kinds[ino] }
		entries := []wire.Entry{{Path: ".", Mode: fs.ModeDir, Ino: num(1)}, {Path: "d", Mode: fs.ModeDir, Ino: num(2)}, {Path: "d/f", Ino: num(3)}, {Path: "g", Ino: num(3)}}
		s, ref := newShadow(entries), newRefShadow(entries)
		// ancestor tells whether a is ino or above it in the model.
		ancestor := func(a, ino uint64) bool {
			for d := 0; d < 64; d++ {
				if ino == a {
					return true
				}
				n := ref.nodes[ino]
				if n == nil || n.first.name == "" {
					return false
				}
				ino = n.first.parent
			}
			return true
		}
		var log []string
		for step := range steps {
			ino := num(uint64(1 + rng.Intn(inos)))
			parent := num(uint64(1 + rng.Intn(inos)))
			name := names[rng.Intn(len(names))]
			var what string
			switch k := rng.Intn(10); {
			case k < 4:
				what = fmt.Sprintf("add(%d, %d, %q)", ino, parent, name)
				if n := ref.nodes[ino]; n != nil && (n.mode.IsDir() != mode(ino).IsDir()) {
					continue
				}
				if mode(parent).IsDir() && !ancestor(ino, parent) {
					s.add(ino, mode(ino), parent, name)
					ref.add(ino, mode(ino), parent, name)
				}
			case k < 6:
				what = fmt.Sprintf("unlink(%d, %q)", parent, name)
				s.unlink(parent, name)
				ref.unlink(parent, name)
			case k < 7:
				what = fmt.Sprintf("drop(%d)", ino)
				if n := ref.nodes[ino]; n != nil && ino != ref.root {
					s.drop(ino)
					ref.drop(n)
				}
			case k < 9:
				n := ref.nodes[ino]
				if n == nil || ino == ref.root || !mode(parent).IsDir() || ancestor(ino, parent) {
					continue
				}
				from := n.first
				if more := ref.more[ino]; len(more) > 0 && rng.Intn(2) == 0 {
					from = more[rng.Intn(len(more))]
				}
				if old, ok := ref.child(parent, name); ok && old != ino && ancestor(old, ino) {
					continue // renaming over one's own ancestor: not something rename(2) does
				}
				what = fmt.Sprintf("move(%d, %v, %d, %q)", ino, from, parent, name)
				s.move(ino, from, parent, name)
				ref.move(ino, from, parent, name)
			default:
				gen := uint32(rng.Intn(3))
				what = fmt.Sprintf("setGen(%d, %d)", ino, gen)
				s.setGen(ino, gen)
				if n := ref.nodes[ino]; n != nil {
					n.gen, n.genKnown = gen, true
				}
			}
			log = append(log, what)
			if err := s.check(); err != nil {
				t.Fatalf("seed %d step %d, after %v: %v", seed, step, log, err)
			}
			got, want := s.snapshot(), ref.snapshot()
			if !reflect.DeepEqual(got, want) {
				t.Fatalf("seed %d step %d, after %v:\nshadow %+v\nmodel  %+v", seed, step, log, got, want)
			}
			for k := uint64(0); k <= inos; k++ {
				i := num(k)
				p1, ok1 := s.path(i)
				p2, ok2 := ref.path(i)
				if p1 != p2 || ok1 != ok2 || s.depth(i) != ref.depth(i) || s.nameCount(i) != refNameCount(ref, i) {
					t.Fatalf("seed %d step %d, after %v: inode %d: path %q %v depth %d names %d; model %q %v %d %d",
						seed, step, log, i, p1, ok1, s.depth(i), s.nameCount(i), p2, ok2, ref.depth(i), refNameCount(ref, i))
				}
				for _, name := range names {
					c1, ok1 := s.child(i, name)
					c2, ok2 := ref.child(i, name)
					if c1 != c2 || ok1 != ok2 {
						t.Fatalf("seed %d step %d: child(%d, %q) = %d %v, model %d %v", seed, step, i, name, c1, ok1, c2, ok2)
					}
				}
				if s.childCount(i) != len(ref.kids[i]) {
					t.Fatalf("seed %d step %d: childCount(%d) = %d, model %d", seed, step, i, s.childCount(i), len(ref.kids[i]))
				}
			}
		}
	}
}

func refNameCount(r *refShadow, ino uint64) int {
	n := r.nodes[ino]
	if n == nil {
		return 0
	}
	return r.nameCount(n)
}

// TestShadowTableGrowsAndShrinks: many numbers in and out of the tables
// (growth, removals that move entries back across the end of the table),
// each still found, none found once gone.
func TestShadowTableGrowsAndShrinks(t *testing.T) {
	s := newShadow([]wire.Entry{{Path: ".", Mode: fs.ModeDir, Ino: 1}})
	rng := rand.New(rand.NewSource(1))
	in := map[uint64]bool{}
	for round := range 20000 {
		ino := uint64(2 + rng.Intn(5000))
		name := fmt.Sprintf("n%d", ino)
		if in[ino] {
			s.unlink(1, name)
			delete(in, ino)
		} else {
			s.add(ino, 0o644, 1, name)
			in[ino] = true
		}
		if round%1000 == 0 {
			if err := s.check(); err != nil {
				t.Fatalf("round %d: %v", round, err)
			}
		}
	}
	if err := s.check(); err != nil {
		t.Fatal(err)
	}
	for ino := uint64(2); ino < 5002; ino++ {
		c, ok := s.child(1, fmt.Sprintf("n%d", ino))
		if ok != in[ino] || s.has(ino) != in[ino] || (ok && c != ino) {
			t.Fatalf("inode %d: child %d %v, has %v; want %v", ino, c, ok, s.has(ino), in[ino])
		}
	}
	if s.childCount(1) != len(in) || s.nodeCount() != len(in)+1 {
		t.Fatalf("%d entries, %d nodes; want %d, %d", s.childCount(1), s.nodeCount(), len(in), len(in)+1)
	}
}

// TestShadowLookupsAllocateLittle: a pass asks the shadow about every
// inode of its records: whether it knows it, of what type, where it is.
// Knowing it and its type cost no allocation, its path at most two,
// whatever its depth (found by review: a copy of the name per lookup,
// a string per level of the path).
func TestShadowLookupsAllocateLittle(t *testing.T) {
	es := []wire.Entry{{Path: ".", Mode: fs.ModeDir, Ino: 1}}
	p := ""
	for d := range 8 {
		p += fmt.Sprintf("dir%d", d)
		es = append(es, wire.Entry{Path: p, Mode: fs.ModeDir, Ino: uint64(10 + d)})
		p += "/"
	}
	es = append(es, wire.Entry{Path: p + "file", Mode: 0o644, Ino: 99})
	s := newShadow(es)
	if got, ok := s.path(99); !ok || got != "dir0/dir1/dir2/dir3/dir4/dir5/dir6/dir7/file" {
		t.Fatalf("path(99) = %q, %v", got, ok)
	}
	node := testing.AllocsPerRun(1000, func() {
		if n, ok := s.node(99); !ok || n.mode.IsDir() {
			t.Fatal("node 99")
		}
	})
	pathAllocs := testing.AllocsPerRun(1000, func() { s.path(99) })
	if node > 0 || pathAllocs > 2 {
		t.Fatalf("node allocates %v times, path %v times; want 0, at most 2", node, pathAllocs)
	}
}
