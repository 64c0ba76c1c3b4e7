package replica

import (
	"fmt"
	"io/fs"
	"math/rand"
	"slices"
	"sort"
	"testing"

	"github.com/duet-ha/duet/pkg/wire"
)

type rekeyView struct {
	names map[uint64][]string          // every node's names (parent rewritten), sorted
	kids  map[uint64]map[string]uint64 // every directory's entries
}

func rekeyViewOf(s *shadow, from, to uint64) rekeyView {
	sub := func(x uint64) uint64 {
		if x == from {
			return to
		}
		return x
	}
	v := rekeyView{names: map[uint64][]string{}, kids: map[uint64]map[string]uint64{}}
	for i := 1; i < len(s.recs); i++ {
		if !s.recs[i].has(recUsed) {
			continue
		}
		ino := s.inoOf(uint32(i))
		var ns []string
		for _, l := range s.names(ino) {
			ns = append(ns, fmt.Sprintf("%d/%s", sub(l.parent), l.name))
		}
		sort.Strings(ns)
		v.names[sub(ino)] = ns
	}
	for dir := range s.dirs {
		m := map[string]uint64{}
		s.eachChild(dir, func(name string, c uint64) bool { m[name] = sub(c); return true })
		v.kids[sub(dir)] = m
	}
	return v
}

// TestShadowRekeyModel: random shadows (as in TestShadowMatchesMapModel),
// and at random a node rekeyed: the shadow's structures hold, the new node
// has every name and entry the old one had, and no other node loses or
// gains a name or an entry.
func TestShadowRekeyModel(t *testing.T) {
	const inos, steps = 24, 300
	names := []string{"a", "b", "c", "dd", ".x"}
	for seed := range 300 {
		rng := rand.New(rand.NewSource(int64(seed)))
		kinds := map[uint64]fs.FileMode{}
		for k := uint64(1); k <= inos; k++ {
			kinds[k] = 0o644
			if k%3 == 2 {
				kinds[k] = fs.ModeDir | 0o755
			}
		}
		entries := []wire.Entry{{Path: ".", Mode: fs.ModeDir, Ino: 1}, {Path: "d", Mode: fs.ModeDir, Ino: 2}, {Path: "d/f", Ino: 3}, {Path: "g", Ino: 3}}
		s := newShadow(entries)
		ancestor := func(a, ino uint64) bool {
			for d := 0; d < 64; d++ {
				if ino == a {
					return true
				}
				i := s.find(ino)
				if i == 0 || s.recs[i].nameLen() == 0 {
					return false
				}
				ino = s.parentOf(i)
			}
			return true
		}
		var log []string
		live := func() []uint64 {
			var out []uint64
			for i := 1; i < len(s.recs); i++ {
				if s.recs[i].has(recUsed) {
					out = append(out, s.inoOf(uint32(i)))
				}
			}
			slices.Sort(out)
			return out
		}
		for step := range steps {
			all := live()
			ino := uint64(1 + rng.Intn(inos))
			if rng.Intn(3) == 0 {
				ino = all[rng.Intn(len(all))]
			}
			parent := uint64(1 + rng.Intn(inos))
			if rng.Intn(2) == 0 {
				parent = all[rng.Intn(len(all))]
			}
			name := names[rng.Intn(len(names))]
			mode := kinds[ino]
			if n, ok := s.node(ino); ok {
				mode = n.mode
			}
			pm := kinds[parent]
			if n, ok := s.node(parent); ok {
				pm = n.mode
			}
			switch k := rng.Intn(12); {
			case k < 4:
				if ino < deadBase && pm.IsDir() && s.has(parent) && !(mode.IsDir() && s.nameCount(ino) > 0) && !ancestor(ino, parent) {
					log = append(log, fmt.Sprintf("add(%d,%d,%q)", ino, parent, name))
					s.add(ino, mode, parent, name)
				}
			case k < 6:
				log = append(log, fmt.Sprintf("unlink(%d,%q)", parent, name))
				s.unlink(parent, name)
			case k < 7:
				if s.has(ino) && ino != s.root {
					log = append(log, fmt.Sprintf("drop(%d)", ino))
					s.drop(ino)
				}
			case k < 9:
				nm := s.names(ino)
				if len(nm) == 0 || ino == s.root || !pm.IsDir() || !s.has(parent) || ancestor(ino, parent) {
					continue
				}
				from := nm[rng.Intn(len(nm))]
				if old, ok := s.child(parent, name); ok && (old == ino || ancestor(old, ino)) {
					continue
				}
				log = append(log, fmt.Sprintf("move(%d,%v,%d,%q)", ino, from, parent, name))
				s.move(ino, from, parent, name)
			default:
				if !s.has(ino) || ino == s.root {
					continue
				}
				before := rekeyViewOf(s, 0, 0)
				to := s.rekey(ino)
				log = append(log, fmt.Sprintf("rekey(%d)=%d", ino, to))
				if err := s.check(); err != nil {
					t.Fatalf("seed %d step %d after %v: %v", seed, step, log, err)
				}
				if s.has(ino) {
					t.Fatalf("seed %d step %d after %v: %d still in the shadow", seed, step, log, ino)
				}
				// before, with ino read as to, is what the shadow must hold.
				want := rekeyView{names: map[uint64][]string{}, kids: map[uint64]map[string]uint64{}}
				sub := func(x uint64) uint64 {
					if x == ino {
						return to
					}
					return x
				}
				for n, ns := range before.names {
					var out []string
					for _, x := range ns {
						var p uint64
						var nm string
						fmt.Sscanf(x, "%d/", &p)
						nm = x[len(fmt.Sprint(p))+1:]
						out = append(out, fmt.Sprintf("%d/%s", sub(p), nm))
					}
					sort.Strings(out)
					want.names[sub(n)] = out
				}
				for d, m := range before.kids {
					mm := map[string]uint64{}
					for k, v := range m {
						mm[k] = sub(v)
					}
					want.kids[sub(d)] = mm
				}
				got := rekeyViewOf(s, 0, 0)
				for n, ns := range want.names {
					if !slices.Equal(ns, got.names[n]) {
						t.Fatalf("seed %d step %d after %v:\nnode %d names %v, want %v", seed, step, log, n, got.names[n], ns)
					}
				}
				for n := range got.names {
					if _, ok := want.names[n]; !ok {
						t.Fatalf("seed %d step %d after %v: node %d appeared", seed, step, log, n)
					}
				}
				for d, m := range want.kids {
					if fmt.Sprint(m) != fmt.Sprint(got.kids[d]) {
						t.Fatalf("seed %d step %d after %v:\ndir %d kids %v, want %v", seed, step, log, d, got.kids[d], m)
					}
				}
				continue
			}
			if err := s.check(); err != nil {
				t.Fatalf("seed %d step %d after %v: %v", seed, step, log, err)
			}
		}
	}
}
