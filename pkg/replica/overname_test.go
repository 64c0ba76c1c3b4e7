package replica

import (
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/duet-ha/duet/pkg/capture"
	"github.com/duet-ha/duet/pkg/journal"
	"github.com/duet-ha/duet/pkg/wire"
	"golang.org/x/sys/unix"
)

// `mv d dX; mv dX/s/t/u d` in one pass: the directory renamed over d's
// name was inside the d the peer holds under it. Renamed there as it was,
// the peer's rename would have d (an ancestor of the source) replaced:
// its applier removed the whole tree, the source with it, and refused
// every retry of the batch (the lab's TestReplicationWorkload on btrfs,
// "rename d37/d22/d31/d21/d11: open d37/d22/d31/d21/: no such file").
// The name's old holder is moved aside first; nothing is shipped again.
func TestBuildDirectoryMovedOverItsOldAncestor(t *testing.T) {
	src, dst, b, sink := syncedPair(t, "d/s/t/u/f", "d/s/g", "d/h")
	if err := os.Rename(filepath.Join(src, "d"), filepath.Join(src, "dX")); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(filepath.Join(src, "dX/s/t/u"), filepath.Join(src, "d")); err != nil {
		t.Fatal(err)
	}
	files := []journal.File{changed(t, src), changed(t, filepath.Join(src, "dX/s/t"))}
	if _, err := b.build(files); err != nil {
		t.Fatal(err)
	}
	sameTrees(t, src, dst)
	if sink.bytes != 0 {
		t.Errorf("shipped %d bytes, want 0 (two renames): %+v", sink.bytes, sink.ops)
	}
}

// `mv a b; mv c a`: the file renamed over a's name is not the one the
// peer holds there, which lives on as b.
func TestBuildFileRenamedOverMovedName(t *testing.T) {
	for _, order := range []string{"a-b", "z-b"} {
		t.Run(order, func(t *testing.T) {
			// The name taken (a or z) sorts before or after the one
			// its old holder moved to (b).
			name := order[:1]
			src, dst, b, sink := syncedPair(t, name, "c")
			if err := os.Rename(filepath.Join(src, name), filepath.Join(src, "b")); err != nil {
				t.Fatal(err)
			}
			if err := os.Rename(filepath.Join(src, "c"), filepath.Join(src, name)); err != nil {
				t.Fatal(err)
			}
			if _, err := b.build([]journal.File{changed(t, src)}); err != nil {
				t.Fatal(err)
			}
			sameTrees(t, src, dst)
			if sink.bytes != 0 {
				t.Errorf("shipped %d bytes, want 0 (renames): %+v", sink.bytes, sink.ops)
			}
		})
	}
}

// A rename whose target is an ancestor of its source cannot be what the
// primary did: the applier refuses it whole. Replacing the target, as it
// does a directory the primary's rename replaced, would remove the source
// with it.
func TestApplyRenameOverAncestorRefused(t *testing.T) {
	dst := t.TempDir()
	writeRandom(t, filepath.Join(dst, "d/s/u/f"), 100)
	writeRandom(t, filepath.Join(dst, "d/g"), 100)
	a, err := NewApplier(dst)
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	for _, op := range []wire.Op{
		{Code: wire.OpRename, Path: "d/s/u", Path2: "d"},
		{Code: wire.OpLink, Path: "d/s/u/f", Path2: "d"},
	} {
		err := a.Apply(&op)
		if err == nil {
			t.Fatalf("%s of %s over %s was applied", op.Code, op.Path, op.Path2)
		}
		t.Logf("refused: %v", err)
	}
	for _, p := range []string{"d/s/u/f", "d/g"} {
		if _, err := os.Stat(filepath.Join(dst, p)); err != nil {
			t.Errorf("%s: %v", p, err)
		}
	}
}

// A peer whose copy lost a directory (removed there by hand, or by a bug
// like the one TestApplyRenameOverAncestorRefused guards against) refuses
// the rename of a file in it, and would refuse it at every retry: the
// primary retried the batch with backoff for ever and the pair never got
// in sync. The refusal says the copy diverged; the primary compares every
// file and restores what the peer lost.
func TestPeerThatDivergedIsResynced(t *testing.T) {
	top := t.TempDir()
	src := filepath.Join(top, "src")
	writeRandom(t, filepath.Join(src, "d/f"), 5000)
	writeRandom(t, filepath.Join(src, "d/g"), 5000)
	writeRandom(t, filepath.Join(src, "e/h"), 5000)
	r := &restartPair{tb: t, src: src, top: filepath.Join(top, "peer"), margin: 50 * time.Millisecond,
		log: slog.New(slog.NewTextHandler(io.Discard, nil))}
	r.startReplica()
	t.Cleanup(r.stopServer)
	r.startSource()
	t.Cleanup(r.stop)
	r.waitSynced()
	if err := os.RemoveAll(filepath.Join(r.top, "data/d")); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(filepath.Join(src, "d/f"), filepath.Join(src, "d/f2")); err != nil {
		t.Fatal(err)
	}
	recorder(t, r.p)(capture.KindAttr, filepath.Join(src, "d"))
	for deadline := time.Now().Add(20 * time.Second); ; time.Sleep(10 * time.Millisecond) {
		st := r.p.Status()
		if st.InSync && st.DivergedResyncs > 0 && !st.Resync.Active && st.PeerCannotApply == "" {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the peer that lost d was not resynced within 20 s: %+v", st)
		}
	}
	sameTrees(t, src, filepath.Join(r.top, "data"))
}

// A backup rotation (`rm -r d; mv d.next d`) in the pass that also moved
// a directory out of the old d (`mv d/sub e/sub2` first): renamed over d
// as it was, the peer's d went with sub in it: until sub2 was shipped
// whole again, later in the pass, the peer held f nowhere (a takeover
// then would lose it, fsynced long before).
func TestBuildRotationAfterChildMovedOut(t *testing.T) {
	src, dst, b, sink := syncedPair(t, "w/d/sub/f", "w/d/g", "w/d.next/g", "w/e/h")
	if err := os.Rename(filepath.Join(src, "w/d/sub"), filepath.Join(src, "w/e/sub2")); err != nil {
		t.Fatal(err)
	}
	if err := os.RemoveAll(filepath.Join(src, "w/d")); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(filepath.Join(src, "w/d.next"), filepath.Join(src, "w/d")); err != nil {
		t.Fatal(err)
	}
	files := []journal.File{changed(t, filepath.Join(src, "w")), changed(t, filepath.Join(src, "w/e"))}
	if _, err := b.build(files); err != nil {
		t.Fatal(err)
	}
	sameTrees(t, src, dst)
	if sink.bytes != 0 {
		t.Errorf("shipped %d bytes, want 0 (renames and a removal): %+v", sink.bytes, sink.ops)
	}
}

// renameat2(RENAME_EXCHANGE) of two files and of two directories (`mv
// --exchange`, an atomic swap of a tree): each name takes the other's
// inode. The peer's holder of the first name is moved aside before the
// other inode takes it; renamed over it as before, the peer lost one of
// the two and was left with the other under both names' history.
func TestBuildExchange(t *testing.T) {
	for _, dirs := range []bool{false, true} {
		t.Run(map[bool]string{false: "files", true: "directories"}[dirs], func(t *testing.T) {
			a, b := "a", "b"
			files := []string{"a", "b"}
			if dirs {
				files = []string{"a/f", "a/g", "b/f"}
			}
			src, dst, bd, sink := syncedPair(t, files...)
			if err := unix.Renameat2(unix.AT_FDCWD, filepath.Join(src, a), unix.AT_FDCWD, filepath.Join(src, b), unix.RENAME_EXCHANGE); err != nil {
				t.Skipf("RENAME_EXCHANGE: %v", err)
			}
			if _, err := bd.build([]journal.File{changed(t, src)}); err != nil {
				t.Fatal(err)
			}
			sameTrees(t, src, dst)
			if sink.bytes != 0 {
				t.Errorf("shipped %d bytes, want 0 (renames): %+v", sink.bytes, sink.ops)
			}
		})
	}
}
