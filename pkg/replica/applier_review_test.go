package replica

import (
	"context"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/duet-ha/duet/pkg/loopfs"
	"github.com/duet-ha/duet/pkg/wire"
	"golang.org/x/sys/unix"
)

// A rename whose two paths name the same directory
// entry (the same path, or, on a case-insensitive directory, a change of
// case: `mv Report tmp; mv tmp report` on the primary, which one pass
// ships as rename Report -> report) is taken for "both names of one
// inode" and the source name is unlinked: the replica loses the file,
// while the primary still has it and the replica counts as in sync.
func TestRenameOntoItsOwnEntryKeepsFile(t *testing.T) {
	t.Run("same path", func(t *testing.T) {
		a, root, _ := newTestApplier(t)
		if err := os.WriteFile(filepath.Join(root, "a"), []byte("precious"), 0o644); err != nil {
			t.Fatal(err)
		}
		if err := a.Apply(&wire.Op{Code: wire.OpRename, Path: "a", Path2: "a"}); err != nil {
			t.Fatal(err)
		}
		if b, err := os.ReadFile(filepath.Join(root, "a")); err != nil || string(b) != "precious" {
			t.Fatalf("after rename a -> a (a no-op on Linux): %q, %v; the file is gone", b, err)
		}
	})
	t.Run("same path, a file of two names", func(t *testing.T) {
		a, root, _ := newTestApplier(t)
		if err := os.WriteFile(filepath.Join(root, "a"), []byte("precious"), 0o644); err != nil {
			t.Fatal(err)
		}
		if err := os.Link(filepath.Join(root, "a"), filepath.Join(root, "b")); err != nil {
			t.Fatal(err)
		}
		if err := a.Apply(&wire.Op{Code: wire.OpRename, Path: "a", Path2: "a"}); err != nil {
			t.Fatal(err)
		}
		for _, n := range []string{"a", "b"} {
			if b, err := os.ReadFile(filepath.Join(root, n)); err != nil || string(b) != "precious" {
				t.Fatalf("after rename a -> a with a second name b: %s reads %q, %v", n, b, err)
			}
		}
	})
	t.Run("two names of one file", func(t *testing.T) {
		// The primary's a went and its b stayed: the source name goes.
		a, root, _ := newTestApplier(t)
		if err := os.WriteFile(filepath.Join(root, "a"), []byte("precious"), 0o644); err != nil {
			t.Fatal(err)
		}
		if err := os.Link(filepath.Join(root, "a"), filepath.Join(root, "b")); err != nil {
			t.Fatal(err)
		}
		if err := a.Apply(&wire.Op{Code: wire.OpRename, Path: "a", Path2: "b"}); err != nil {
			t.Fatal(err)
		}
		if _, err := os.Lstat(filepath.Join(root, "a")); !os.IsNotExist(err) {
			t.Fatalf("a after rename a -> b of two names of one file: %v, want gone", err)
		}
		if b, err := os.ReadFile(filepath.Join(root, "b")); err != nil || string(b) != "precious" {
			t.Fatalf("b reads %q, %v", b, err)
		}
	})
	t.Run("a directory onto itself", func(t *testing.T) {
		a, root, _ := newTestApplier(t)
		if err := os.MkdirAll(filepath.Join(root, "d", "e"), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := a.Apply(&wire.Op{Code: wire.OpRename, Path: "d", Path2: "d"}); err != nil {
			t.Fatal(err)
		}
		if _, err := os.Stat(filepath.Join(root, "d", "e")); err != nil {
			t.Fatal(err)
		}
	})
	t.Run("xfs ascii-ci case change", func(t *testing.T) {
		mnt := ciXFS(t)
		root := filepath.Join(mnt, "replica")
		if err := os.Mkdir(root, 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(root, "Report.txt"), []byte("precious"), 0o644); err != nil {
			t.Fatal(err)
		}
		a, err := NewApplier(root)
		if err != nil {
			t.Fatal(err)
		}
		defer a.Close()
		// What the primary (same kind of filesystem) holds after
		// `mv Report.txt tmp; mv tmp report.txt`: one file, report.txt.
		if err := a.Apply(&wire.Op{Code: wire.OpRename, Path: "Report.txt", Path2: "report.txt"}); err != nil {
			t.Fatal(err)
		}
		ents, _ := os.ReadDir(root)
		var names []string
		for _, e := range ents {
			names = append(names, e.Name())
		}
		if b, err := os.ReadFile(filepath.Join(root, "report.txt")); err != nil || string(b) != "precious" {
			t.Fatalf("after rename Report.txt -> report.txt on a case-insensitive directory: %q, %v (directory holds %q): the file is lost on the replica",
				b, err, names)
		}
	})
}

// ciXFS mounts a small XFS made with ASCII case-insensitive names.
func ciXFS(t *testing.T) string {
	t.Helper()
	loopfs.RequireRoot(t)
	if _, err := exec.LookPath("mkfs.xfs"); err != nil {
		t.Skip("mkfs.xfs not installed")
	}
	dir := t.TempDir()
	img, mnt := filepath.Join(dir, "img"), filepath.Join(dir, "mnt")
	if err := os.WriteFile(img, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(img, 512<<20); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command("mkfs.xfs", "-q", "-n", "version=ci", img).CombinedOutput(); err != nil {
		t.Skipf("mkfs.xfs -n version=ci: %v %s", err, out)
	}
	out, err := exec.Command("losetup", "--find", "--show", img).CombinedOutput()
	if err != nil {
		t.Fatalf("losetup: %v %s", err, out)
	}
	dev := strings.TrimSpace(string(out))
	t.Cleanup(func() { exec.Command("losetup", "-d", dev).Run() })
	os.Mkdir(mnt, 0o755)
	if out, err := exec.Command("mount", dev, mnt).CombinedOutput(); err != nil {
		t.Skipf("this kernel does not mount ascii-ci XFS: %v %s", err, out)
	}
	t.Cleanup(func() { exec.Command("umount", "-l", mnt).Run() })
	return mnt
}

// The targeted flush records the directories whose entries
// changed by path; a later rename of such a directory (or of one of its
// ancestors) in the same sync window leaves the recorded path naming
// nothing: flush skips it (ENOENT), and the directory that now holds the
// new entries is never fsynced, yet the sync is acknowledged durable.
// Only a dirty *file* makes a rename fall back to syncfs.
func TestFlushFollowsRenamedDirectory(t *testing.T) {
	for _, tc := range []struct {
		name string
		ops  []wire.Op
	}{
		{"rename inside, then the directory renamed", []wire.Op{
			{Code: wire.OpRename, Path: "d/tmp", Path2: "d/conf"},
			{Code: wire.OpRename, Path: "d", Path2: "e"},
		}},
		{"hard link into it, then the directory renamed", []wire.Op{
			{Code: wire.OpLink, Path: "f", Path2: "d/g"},
			{Code: wire.OpRename, Path: "d", Path2: "e"},
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			a, root, _ := newTestApplier(t)
			os.Mkdir(filepath.Join(root, "d"), 0o755)
			os.WriteFile(filepath.Join(root, "d", "tmp"), []byte("new"), 0o644)
			os.WriteFile(filepath.Join(root, "f"), []byte("f"), 0o644)
			if err := a.Sync(); err != nil { // a new applier's first one is a syncfs
				t.Fatal(err)
			}
			c := &syncfsCounter{}
			a.syncfs = c.syncfs
			for i := range tc.ops {
				if err := a.Apply(&tc.ops[i]); err != nil {
					t.Fatal(err)
				}
			}
			planned := a.overflow || a.dirs["e"]
			var dirs []string
			for d := range a.dirs {
				dirs = append(dirs, d)
			}
			if err := a.Sync(); err != nil {
				t.Fatal(err)
			}
			if !planned && c.calls == 0 {
				t.Fatalf("Sync flushed directories %q (the ones gone by then skipped) and no syncfs: directory e, which holds the entry the batch changed, was never fsynced", dirs)
			}
		})
	}
}

// blockingHandler is a slog handler that blocks records whose message
// contains match until release is closed (a daemon stalled, then killed,
// while it logs).
type blockingHandler struct {
	slog.Handler
	match   string
	entered chan struct{}
	once    *sync.Once
	release chan struct{}
}

func (h blockingHandler) Handle(ctx context.Context, r slog.Record) error {
	if strings.Contains(r.Message, h.match) {
		h.once.Do(func() { close(h.entered) })
		<-h.release
	}
	return h.Handler.Handle(ctx, r)
}

func (h blockingHandler) WithAttrs(as []slog.Attr) slog.Handler {
	h.Handler = h.Handler.WithAttrs(as)
	return h
}

// After a failed flush the copy's progress must be forgotten on
// disk before anything else (Linux reports the writeback error once: the
// restarted daemon's flushes succeed without the lost pages). distrust
// logs first and writes the state file after: a daemon killed while that
// log line is written (a stalled journald, then a stop timeout's SIGKILL)
// restarts from the old progress, the primary resumes after the lost
// batch, and the next sync acknowledges it durable. Same order in the
// background sync (log, then forget).
func TestDistrustPersistsBeforeItLogs(t *testing.T) {
	stateDir := filepath.Join(t.TempDir(), "state")
	os.Mkdir(stateDir, 0o700)
	h := blockingHandler{Handler: slog.NewTextHandler(io.Discard, nil), match: "a flush of the replica failed",
		entered: make(chan struct{}), once: &sync.Once{}, release: make(chan struct{})}
	s := newTestSecondaryLog(t, stateDir, slog.New(h))
	defer close(h.release) // before the servers' cleanups, which wait for their connections
	s.syncfs = func(int) error { return unix.EIO }
	p := s.connect(t, 7)
	p.batch(1, wire.Op{Code: wire.OpCreate, Path: "f", Mode: 0o644}, wire.Op{Code: wire.OpWrite, Path: "f", Data: []byte("lost by the disk")})
	p.ack(1, 0)
	p.send(&wire.Frame{Type: wire.TypeSync, Seq: 1})
	select {
	case <-h.entered:
	case <-time.After(10 * time.Second):
		t.Fatal("the failed flush was not reported")
	}
	// The daemon dies here, in the log call; a new one starts on the same
	// state directory (same boot: the error was seen, its flushes succeed).
	s2 := newTestSecondary(t, stateDir)
	p2 := s2.connect(t, 7)
	if p2.w.Session == 7 && p2.w.Applied >= 1 {
		p2.send(&wire.Frame{Type: wire.TypeSync, Seq: 1})
		f, err := p2.read()
		t.Fatalf("killed after its flush failed, restarted: the welcome resumes session %d at batch %d, and the next sync answers %s seq %d flags %#x (%v): batch 1, whose flush failed, acknowledged durable",
			p2.w.Session, p2.w.Applied, f.Type, f.Seq, f.Flags, err)
	}
}

// TestRenameOfMissingSourceIsDivergence: a rename whose source this copy
// lacks while its target exists was taken for a replay (done before a
// restart) wherever it came: the target kept what this copy had there,
// the source's file was missing, and the primary counted the copy in sync.
// Only the first op applied of a connection's first batch can be a
// replay; any later one is refused as a divergence (the primary then
// compares the trees), and the replay is still accepted.
func TestRenameOfMissingSourceIsDivergence(t *testing.T) {
	stateDir := filepath.Join(t.TempDir(), "state")
	os.Mkdir(stateDir, 0o700)
	s := newTestSecondary(t, stateDir)
	os.WriteFile(filepath.Join(s.data, "b"), []byte("this copy's old b"), 0o644)
	p := s.connect(t, 7)
	// The connection's first batch, first op: may be a replay.
	p.batch(1, wire.Op{Code: wire.OpRename, Path: "a", Path2: "b"})
	p.ack(1, 0)
	// A later batch: a is not there, b is: this copy differs.
	p.batch(2, wire.Op{Code: wire.OpCreate, Path: "c", Mode: 0o644}, wire.Op{Code: wire.OpRename, Path: "a2", Path2: "b"})
	f, err := p.read()
	if err != nil {
		t.Fatal(err)
	}
	if f.Type != wire.TypeError || f.Flags&wire.FlagDiverged == 0 {
		t.Fatalf("a rename of a missing source over an existing target in batch 2: got %s seq %d flags %#x (%s), want a refusal saying this copy diverged",
			f.Type, f.Seq, f.Flags, f.Payload)
	}
	if !strings.Contains(string(f.Payload), "source is missing") {
		t.Errorf("refusal: %s", f.Payload)
	}
}
