package replica

import (
	"log/slog"
	"os"
	"path/filepath"
	"testing"

	"github.com/duet-ha/duet/pkg/capture"
	"github.com/duet-ha/duet/pkg/fstree"
	"github.com/duet-ha/duet/pkg/journal"
	"github.com/duet-ha/duet/pkg/wire"
	"golang.org/x/sys/unix"
)

// syncedPair makes src, a copy of it in dst, and a builder whose shadow
// is that common state, shipping into dst.
func syncedPair(t *testing.T, files ...string) (src, dst string, b *builder, sink *applySink) {
	t.Helper()
	top := t.TempDir()
	src, dst = filepath.Join(top, "src"), filepath.Join(top, "dst")
	os.Mkdir(src, 0o755)
	for _, f := range files {
		writeRandom(t, filepath.Join(src, f), 100)
	}
	if err := os.CopyFS(dst, os.DirFS(src)); err != nil {
		t.Fatal(err)
	}
	root, err := fstree.OpenRoot(src)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { root.Close() })
	local, _, err := fstree.Scan(root, false)
	if err != nil {
		t.Fatal(err)
	}
	a, err := NewApplier(dst)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { a.Close() })
	sink = &applySink{a: a, t: t}
	b = newBuilder(root, 0, newShadow(local), nil, sink, slog.New(slog.DiscardHandler), nil)
	return src, dst, b, sink
}

// changed is the journal entry of a directory whose entries changed.
func changed(t *testing.T, path string) journal.File {
	t.Helper()
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		t.Fatal(err)
	}
	return journal.File{Key: capture.InodeKey{Ino: st.Ino}, Attr: true}
}

func sameTrees(t *testing.T, src, dst string) {
	t.Helper()
	r1, _ := fstree.OpenRoot(src)
	defer r1.Close()
	r2, _ := fstree.OpenRoot(dst)
	defer r2.Close()
	l, _, _ := fstree.Scan(r1, true)
	p, _, _ := fstree.Scan(r2, true)
	if diffs := fstree.Compare(l, p); len(diffs) != 0 {
		t.Fatalf("trees differ: %v", diffs)
	}
}

// A tree deleted and at once rebuilt at the same path: the peer's old
// directory must not survive under the new one (its entries that the new
// tree lacks were left on the peer: "only on peer" after a churn).
func TestBuildDirectoryReplacedAtSameName(t *testing.T) {
	src, dst, b, _ := syncedPair(t, "w/old1", "w/sub/old2", "w/keep")
	os.RemoveAll(filepath.Join(src, "w"))
	writeRandom(t, filepath.Join(src, "w/keep"), 50)
	writeRandom(t, filepath.Join(src, "w/new"), 70)
	// The new inodes may reuse the old ones' numbers: capture reports
	// each allocation, as it does in the daemon.
	files := []journal.File{changed(t, src)}
	for _, p := range []string{"w", "w/keep", "w/new"} {
		f := changed(t, filepath.Join(src, p))
		f.NewSeq = 1
		files = append(files, f)
	}
	if _, err := b.build(files); err != nil {
		t.Fatal(err)
	}
	sameTrees(t, src, dst)
}

// `mv w w.old; mkdir w`: the peer renames its w away before it makes the
// new one, and does not ship w.old's content again.
func TestBuildRenameAwayThenRecreate(t *testing.T) {
	src, dst, b, sink := syncedPair(t, "w/a", "w/b")
	os.Rename(filepath.Join(src, "w"), filepath.Join(src, "w.old"))
	writeRandom(t, filepath.Join(src, "w/c"), 30)
	if _, err := b.build([]journal.File{changed(t, src)}); err != nil {
		t.Fatal(err)
	}
	sameTrees(t, src, dst)
	if sink.bytes != 30 {
		t.Fatalf("shipped %d bytes, want 30 (only w/c: w.old is a rename)", sink.bytes)
	}
	var renamed bool
	for _, op := range sink.ops {
		renamed = renamed || op.Code == wire.OpRename && op.Path == "w" && op.Path2 == "w.old"
	}
	if !renamed {
		t.Fatalf("w was not renamed to w.old on the peer: %+v", sink.ops)
	}
}

// `mv w archive/w.old; mkdir w`, w.old in a directory reconciled after w's:
// the peer's w is moved aside, not removed, and renamed into archive from
// there. At no op of the pass may the peer hold w/a's bytes nowhere (a
// takeover then would lose a file fsynced long before), and w/a is not
// shipped again.
func TestBuildMoveAwayDeeperThenRecreate(t *testing.T) {
	src, dst, b, sink := syncedPair(t, "w/a", "archive/keep")
	want, _ := os.ReadFile(filepath.Join(src, "w/a"))
	var nowhere []string
	b.out = sinkFunc(func(op *wire.Op) error {
		sink.add(op)
		found := false
		filepath.WalkDir(dst, func(p string, d os.DirEntry, err error) error {
			if err == nil && d.Type().IsRegular() {
				if got, _ := os.ReadFile(p); string(got) == string(want) {
					found = true
				}
			}
			return nil
		})
		if !found {
			nowhere = append(nowhere, op.Code.String()+" "+op.Path)
		}
		return nil
	})
	if err := os.Rename(filepath.Join(src, "w"), filepath.Join(src, "archive/w.old")); err != nil {
		t.Fatal(err)
	}
	writeRandom(t, filepath.Join(src, "w/c"), 30)
	if _, err := b.build([]journal.File{changed(t, src), changed(t, filepath.Join(src, "archive"))}); err != nil {
		t.Fatal(err)
	}
	sameTrees(t, src, dst)
	if len(nowhere) > 0 {
		t.Errorf("after %d ops (first: %s) the peer held w/a nowhere", len(nowhere), nowhere[0])
	}
	if sink.bytes != 30 {
		t.Errorf("shipped %d bytes, want 30 (w/c only: w.old is a rename)", sink.bytes)
	}
}

type sinkFunc func(op *wire.Op) error

func (f sinkFunc) add(op *wire.Op) error { return f(op) }
