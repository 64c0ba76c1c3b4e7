package nfsd

import (
	"reflect"
	"slices"
	"testing"
)

func set(id, parent uint64, name string) record {
	return record{kind: kindSet, id: id, parent: parent, name: name}
}

func move(id, from uint64, fromName string, parent uint64, name string, replaced uint64) record {
	return record{kind: kindMove, id: id, from: from, fromName: fromName, parent: parent, name: name, replaced: replaced}
}

func del(id uint64) record { return record{kind: kindDel, id: id} }

// TestTreeApply replays records and checks where each ID is: a rename of
// a directory carries its children, a name taken by another ID drops the
// old one with its subtree, and records that would break the tree are
// refused.
func TestTreeApply(t *testing.T) {
	for _, tc := range []struct {
		name   string
		recs   []record
		bad    []int             // indices of the records that must be refused
		paths  map[uint64]string // "" for the root, "-" for unknown
		lookup map[string]uint64 // path -> ID walk finds, 0 for none
	}{
		{name: "nested", recs: []record{set(2, 1, "a"), set(3, 2, "b")},
			paths: map[uint64]string{1: "", 2: "a", 3: "a/b"}, lookup: map[string]uint64{"a/b": 3, "a/c": 0}},
		{name: "directory rename carries children", recs: []record{set(2, 1, "a"), set(3, 2, "b"), move(2, 1, "a", 1, "c", 0)},
			paths: map[uint64]string{2: "c", 3: "c/b"}, lookup: map[string]uint64{"c/b": 3, "a": 0}},
		{name: "rename over a name drops its subtree", recs: []record{set(2, 1, "a"), set(3, 2, "b"), set(4, 1, "x"), move(4, 1, "x", 1, "a", 2)},
			paths: map[uint64]string{2: "-", 3: "-", 4: "a"}, lookup: map[string]uint64{"a": 4, "x": 0, "a/b": 0}},
		{name: "del drops the subtree", recs: []record{set(2, 1, "a"), set(3, 2, "b"), set(5, 1, "k"), del(2)},
			paths: map[uint64]string{2: "-", 3: "-", 5: "k"}},
		{name: "unknown parent", recs: []record{set(2, 1, "a"), set(3, 9, "b")}, bad: []int{1},
			paths: map[uint64]string{2: "a", 3: "-"}},
		{name: "directory under itself", recs: []record{set(2, 1, "a"), set(3, 2, "b"), move(2, 1, "a", 3, "a", 0)}, bad: []int{2},
			paths: map[uint64]string{2: "a", 3: "a/b"}},
		{name: "reserved IDs", recs: []record{set(rootID, 1, "r"), set(0, 1, "z")}, bad: []int{0, 1},
			paths: map[uint64]string{1: ""}, lookup: map[string]uint64{"r": 0, "z": 0}},
		{name: "undo of a move", recs: append([]record{set(2, 1, "a"), set(3, 1, "b"), move(2, 1, "a", 1, "b", 3)}, undo(move(2, 1, "a", 1, "b", 3))...),
			paths: map[uint64]string{2: "a", 3: "b"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			tr := newTree()
			for i, r := range tc.recs {
				err := tr.apply(r)
				if (err != nil) != slices.Contains(tc.bad, i) {
					t.Errorf("record %d %+v: err %v", i, r, err)
				}
			}
			for id, want := range tc.paths {
				comps, ok := tr.path(id)
				got := join(comps)
				if !ok {
					got = "-"
				}
				if got != want {
					t.Errorf("path of %d: %q, want %q", id, got, want)
				}
			}
			for p, want := range tc.lookup {
				comps := splitTest(p)
				ids := tr.walk(comps)
				got := uint64(0)
				if len(ids) == len(comps) {
					got = last(ids)
				}
				if got != want {
					t.Errorf("walk %q: %d, want %d", p, got, want)
				}
			}
			again := newTree()
			for _, r := range tr.snapshot() {
				if err := again.apply(r); err != nil {
					t.Fatalf("replaying the snapshot: %v", err)
				}
			}
			if got, want := places(again), places(tr); !reflect.DeepEqual(got, want) {
				t.Errorf("snapshot replays to %v, want %v", got, want)
			}
		})
	}
}

// places maps every ID to its path.
func places(tr *tree) map[uint64]string {
	out := map[uint64]string{}
	for id := range tr.nodes {
		comps, _ := tr.path(id)
		out[id] = join(comps)
	}
	return out
}

func splitTest(p string) []string {
	comps, err := split(p)
	if err != nil {
		panic(err)
	}
	return comps
}
