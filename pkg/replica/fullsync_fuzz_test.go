package replica

import (
	"fmt"
	mrand "math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"testing"
	"time"

	"github.com/duet-ha/duet/pkg/fstree"
	"github.com/duet-ha/duet/pkg/wire"
	"golang.org/x/sys/unix"
)

// TestFullSyncRandomTrees runs full syncs between random trees with names
// that sort around '/' and bytes of 0x80 and up, hard links, files renamed
// while away and entries that changed type, over listings of chunks of a
// few entries: the peer ends equal to this tree, its hard links included,
// and the shadow is the peer's namespace.
func TestFullSyncRandomTrees(t *testing.T) {
	defer func(n int) { listingChunk = n }(listingChunk)
	names := []string{"a", "a-", "a.b", "a0", "a\n", "b", "\x80", "\xff", "é", " ", "z", "a b"}
	for seed := range 24 {
		listingChunk = 1 + seed%7
		rng := mrand.New(mrand.NewPCG(uint64(seed), 9))
		top := t.TempDir()
		src, dst := filepath.Join(top, "src"), filepath.Join(top, "dst")
		mtime := time.Unix(1_700_000_000, 0)
		var srcFiles []string
		var build func(dir string, depth int, files *[]string, salt string)
		build = func(dir string, depth int, files *[]string, salt string) {
			os.MkdirAll(dir, 0o755)
			for _, n := range names {
				p := filepath.Join(dir, n)
				switch r := rng.IntN(10); {
				case r < 3:
				case r < 5 && depth < 3:
					build(p, depth+1, files, salt)
				case r < 6:
					os.Symlink(n+salt, p)
				default:
					size := len(*files) + 1
					os.WriteFile(p, []byte(salt+string(make([]byte, size))), 0o644)
					os.Chtimes(p, mtime, mtime.Add(time.Duration(rng.IntN(4))*time.Second))
					*files = append(*files, p)
				}
			}
		}
		build(src, 0, &srcFiles, "s")
		// Hard links here, across directories.
		for i := 0; i+1 < len(srcFiles) && i < 6; i += 2 {
			a, b := srcFiles[rng.IntN(len(srcFiles))], srcFiles[rng.IntN(len(srcFiles))]
			if a != b {
				os.Remove(b)
				os.Link(a, b)
			}
		}
		// There: a copy, then changed as while the peer was away.
		filepath.Walk(src, func(p string, fi os.FileInfo, err error) error {
			if err != nil {
				return err
			}
			rel, _ := filepath.Rel(src, p)
			q := filepath.Join(dst, rel)
			switch {
			case fi.IsDir():
				os.MkdirAll(q, 0o755)
			case fi.Mode()&os.ModeSymlink != 0:
				tg, _ := os.Readlink(p)
				os.Symlink(tg, q)
			default:
				data, _ := os.ReadFile(p)
				os.WriteFile(q, data, 0o644)
				os.Chtimes(q, fi.ModTime(), fi.ModTime())
			}
			return nil
		})
		var dstFiles []string
		for _, f := range srcFiles {
			rel, _ := filepath.Rel(src, f)
			q := filepath.Join(dst, rel)
			switch rng.IntN(8) {
			case 0: // renamed here while away: the peer has it under its old name
				os.Rename(q, filepath.Join(filepath.Dir(q), "r"+filepath.Base(q)))
			case 1:
				os.Remove(q)
			case 2: // a directory there
				os.Remove(q)
				os.MkdirAll(filepath.Join(q, "x"), 0o755)
			case 3:
				os.WriteFile(q, []byte("changed there"), 0o644)
			}
		}
		build(filepath.Join(dst, names[rng.IntN(len(names))]), 2, &dstFiles, "d")
		root, local := scanSource(t, src)
		ll, _, err := scanListing(root, false)
		if err != nil {
			t.Fatal(err)
		}
		droot, peer := peerManifest(t, dst, wire.ManifestQuery{All: seed%2 == 0})
		b, sink := applyingBuilder(t, root, nil, dst)
		if err := b.fullSync(ll, listingOf(peer), &treeSync{sumMatched: seed%2 == 0}); err != nil {
			t.Fatal(err)
		}
		checkSynced(t, fmt.Sprintf("seed %d, chunks of %d", seed, listingChunk), root, local, droot, dst, b, sink)
		// The same tree to an empty peer: sent as it is read.
		empty := filepath.Join(top, "empty")
		if err := os.Mkdir(empty, 0o755); err != nil {
			t.Fatal(err)
		}
		eb, esink := applyingBuilder(t, root, nil, empty)
		if _, err := eb.streamSync(func(fn func(*wire.Entry) error) (int, error) { return fstree.Walk(root, false, fn) }, nil, nil); err != nil {
			t.Fatal(err)
		}
		eroot, err := fstree.OpenRoot(empty)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { eroot.Close() })
		checkSynced(t, fmt.Sprintf("seed %d, streamed to an empty peer", seed), root, local, eroot, empty, eb, esink)
	}
}

// checkSynced fails t unless the peer's tree at dst (droot) is the tree at
// root, listed in local, its hard links included, and b's shadow holds
// what the peer holds.
func checkSynced(t *testing.T, what string, root *os.File, local []wire.Entry, droot *os.File, dst string, b *builder, sink *applySink) {
	t.Helper()
	counts := map[wire.OpCode]int{}
	for _, op := range sink.ops {
		counts[op.Code]++
	}
	t.Logf("%s: %d entries, ops %v", what, len(local), counts)
	l2, _, _ := fstree.Scan(root, true)
	p2, _, _ := fstree.Scan(droot, true)
	if diffs := fstree.Compare(l2, p2); len(diffs) != 0 {
		t.Fatalf("%s: trees differ after the full sync: %v", what, diffs)
	}
	// Hard links: names of one inode here are one inode there.
	byIno := map[uint64][]string{}
	for _, e := range local {
		if e.Mode.IsRegular() {
			byIno[e.Ino] = append(byIno[e.Ino], e.Path)
		}
	}
	for _, ps := range byIno {
		var first uint64
		for _, p := range ps {
			var st unix.Stat_t
			unix.Lstat(filepath.Join(dst, p), &st)
			if first == 0 {
				first = st.Ino
			} else if st.Ino != first {
				t.Fatalf("%s: %q are one file here, not on the peer", what, ps)
			}
		}
	}
	// The shadow holds what the peer holds, by this tree's inodes.
	want := newShadow(local)
	for _, e := range local {
		if e.Path == "." {
			continue
		}
		if !b.sh.has(e.Ino) {
			t.Fatalf("%s: shadow lacks %q", what, e.Path)
		}
		var got []string
		for _, l := range b.sh.names(e.Ino) {
			p, _ := b.sh.linkPath(l)
			got = append(got, p)
		}
		var wantNames []string
		for _, l := range want.names(e.Ino) {
			p, _ := want.linkPath(l)
			wantNames = append(wantNames, p)
		}
		slices.Sort(got)
		slices.Sort(wantNames)
		if !slices.Equal(got, wantNames) {
			t.Fatalf("%s: shadow names %q, want %q", what, got, wantNames)
		}
	}
	if b.sh.nodeCount() != want.nodeCount() {
		t.Fatalf("%s: shadow of %d nodes, want %d", what, b.sh.nodeCount(), want.nodeCount())
	}
}
