package replica

import (
	"log/slog"
	"os"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"github.com/duet-ha/duet/pkg/capture"
)

// The backup rotation of TestResyncBitmapDirRotated (`rm -r b.2; mv b.1
// b.2` while the peer was away), then an entry made in the moved
// directory (`touch b.2/stamp`): its mtime moves with its ctime, so it no
// longer looks moved, and its files, of the size and mtime the peer's old
// b.2 files have, were trusted: the peer kept the removed b.2/f's bytes
// under the name. A primary that ran on while the peer was away still
// holds the shadow of the peer's last session, which names b.2's inode
// b.1: the move is known whatever the times say.
func TestResyncBitmapDirRotatedThenEntryAdded(t *testing.T) {
	for _, data := range []bool{false, true} {
		t.Run(map[bool]string{false: "unwritten", true: "appended"}[data], func(t *testing.T) {
			top := t.TempDir()
			src, dst := filepath.Join(top, "src"), filepath.Join(top, "dst")
			writeRandom(t, filepath.Join(src, "b.1/f"), 5000)
			writeRandom(t, filepath.Join(src, "b.2/f"), 5000)
			if err := os.CopyFS(dst, os.DirFS(src)); err != nil {
				t.Fatal(err)
			}
			same := time.Now().Add(-time.Hour)
			for _, d := range []string{src, dst} {
				for _, p := range []string{"b.1/f", "b.2/f", "b.1", "b.2"} {
					os.Chtimes(filepath.Join(d, p), same, same)
				}
			}
			_, entries := scanSource(t, src)
			sh := newShadow(entries) // what the peer was given
			// The peer is away; duet runs on and captures what follows.
			ino := inoOf(t, filepath.Join(src, "b.1/f"))
			if data {
				f, err := os.OpenFile(filepath.Join(src, "b.1/f"), os.O_WRONLY|os.O_APPEND, 0)
				if err != nil {
					t.Fatal(err)
				}
				f.Write(make([]byte, 1000))
				f.Close()
			}
			if err := os.RemoveAll(filepath.Join(src, "b.2")); err != nil {
				t.Fatal(err)
			}
			if err := os.Rename(filepath.Join(src, "b.1"), filepath.Join(src, "b.2")); err != nil {
				t.Fatal(err)
			}
			if err := os.WriteFile(filepath.Join(src, "b.2/stamp"), nil, 0o644); err != nil {
				t.Fatal(err)
			}
			d := attrMarks(t, src, filepath.Join(src, "b.2"))
			d.record(&capture.Record{Kind: capture.KindNew, Ino: inoOf(t, filepath.Join(src, "b.2/stamp"))}, 2)
			if data {
				d.record(&capture.Record{Kind: capture.KindData, Ino: ino, Pos: 5000, Len: 1000}, 3)
				d.record(&capture.Record{Kind: capture.KindAttr, Ino: ino}, 4)
			}
			if fi, err := os.Stat(filepath.Join(src, "b.2")); err != nil {
				t.Fatal(err)
			} else if ct := ctimeOf(fi); !ct.Equal(fi.ModTime()) {
				t.Skipf("b.2's ctime %v is not its mtime %v: the times tell the move here, the case is not built", ct, fi.ModTime())
			}
			bitmapResyncShadow(t, src, dst, d, sh)
			sameTrees(t, src, dst)
		})
	}
}

// ctimeOf is fi's inode change time.
func ctimeOf(fi os.FileInfo) time.Time {
	st := fi.Sys().(*syscall.Stat_t)
	return time.Unix(st.Ctim.Sec, st.Ctim.Nsec)
}

// pathIs agrees with path, for every entry of a tree and for paths that
// differ from the right one by a character, a component or a slash.
func TestShadowPathIs(t *testing.T) {
	src := t.TempDir()
	for _, p := range []string{"a/b/c/f", "a/b/g", "a/bb/f", "ab/f", "x", "a/b/c/d/e/h"} {
		writeRandom(t, filepath.Join(src, p), 10)
	}
	if err := os.Link(filepath.Join(src, "x"), filepath.Join(src, "a/x2")); err != nil {
		t.Fatal(err)
	}
	_, entries := scanSource(t, src)
	sh := newShadow(entries)
	for _, e := range entries {
		want, ok := sh.path(e.Ino)
		if !ok {
			t.Fatalf("%s: not in the shadow", e.Path)
		}
		if !sh.pathIs(e.Ino, want) {
			t.Errorf("pathIs(%s's inode, %q) = false, path gives %q", e.Path, want, want)
		}
		for _, other := range []string{want + "x", "x" + want, want + "/", "/" + want, "./" + want, "a/" + want, "", "."} {
			if other != want && sh.pathIs(e.Ino, other) {
				t.Errorf("pathIs(%s's inode, %q) = true, path gives %q", e.Path, other, want)
			}
		}
		if d := filepath.Dir(want); want != "." && sh.pathIs(e.Ino, d) {
			t.Errorf("pathIs(%s's inode, %q) = true, its parent's path", e.Path, d)
		}
	}
	if sh.pathIs(1<<40, "x") {
		t.Error("pathIs of an inode the shadow does not hold = true")
	}
}

// TestResyncAfterPeerAwayFindsRotatedDirectory is
// TestResyncBitmapDirRotatedThenEntryAdded through a Primary and a
// Server: the pair in sync, the replica's host goes away (its state file
// gone with its boot), the source runs on and captures the rotation, the
// replica comes back and the source resyncs it from its bitmap. The
// source's shadow of the last session must reach the comparison.
func TestResyncAfterPeerAwayFindsRotatedDirectory(t *testing.T) {
	top := t.TempDir()
	src := filepath.Join(top, "src")
	writeRandom(t, filepath.Join(src, "b.1/f"), 5000)
	writeRandom(t, filepath.Join(src, "b.2/f"), 5000)
	same := time.Now().Add(-time.Hour)
	for _, p := range []string{"b.1/f", "b.2/f", "b.1", "b.2"} {
		os.Chtimes(filepath.Join(src, p), same, same)
	}
	// The pair's log, at debug (every op shipped and applied), shown if
	// the test fails.
	var logBuf syncBuffer
	defer func() {
		if t.Failed() {
			t.Logf("the pair's log:\n%s", logBuf.String())
		}
	}()
	r := &restartPair{tb: t, src: src, top: filepath.Join(top, "peer"), margin: 50 * time.Millisecond,
		log: slog.New(slog.NewTextHandler(&logBuf, &slog.HandlerOptions{Level: slog.LevelDebug}))}
	r.startReplica()
	r.startSource()
	defer func() {
		r.stop()
		r.p.Close()
	}()
	r.waitSynced()
	first := r.p.Status().FullSyncs
	// The replica's host goes away.
	r.stopServer()
	r.p.Drop("test: the peer is lost")
	if err := os.Remove(filepath.Join(r.top, "state", "replica-data.state")); err != nil {
		t.Fatal(err)
	}
	record := recorder(t, r.p)
	if err := os.RemoveAll(filepath.Join(src, "b.2")); err != nil {
		t.Fatal(err)
	}
	record(capture.KindAttr, src)
	if err := os.Rename(filepath.Join(src, "b.1"), filepath.Join(src, "b.2")); err != nil {
		t.Fatal(err)
	}
	record(capture.KindAttr, src)
	record(capture.KindAttr, filepath.Join(src, "b.2"))
	stamp := filepath.Join(src, "b.2/stamp")
	if err := os.WriteFile(stamp, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	record(capture.KindNew, stamp)
	record(capture.KindAttr, stamp)
	record(capture.KindAttr, filepath.Join(src, "b.2"))
	if fi, err := os.Stat(filepath.Join(src, "b.2")); err != nil {
		t.Fatal(err)
	} else if ct := ctimeOf(fi); !ct.Equal(fi.ModTime()) {
		t.Skipf("b.2's ctime %v is not its mtime %v: the times tell the move here, the case is not built", ct, fi.ModTime())
	}
	// The replica is back.
	r.startReplica()
	defer r.stopServer()
	for deadline := time.Now().Add(time.Minute); ; time.Sleep(time.Millisecond) {
		st := r.p.Status()
		if st.InSync && st.FullSyncs > first && !st.Resync.Active {
			if st.Resync.Mode != "bitmap" {
				t.Fatalf("the replica was resynced in mode %q, want bitmap", st.Resync.Mode)
			}
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("no resync after the replica came back: %+v", st)
		}
	}
	sameTrees(t, src, filepath.Join(r.top, "data"))
}
