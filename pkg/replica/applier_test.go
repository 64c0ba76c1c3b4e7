package replica

import (
	"errors"
	"fmt"
	"net"
	"os"
	"path"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/duet-ha/duet/pkg/fstree"
	"github.com/duet-ha/duet/pkg/wire"
	"golang.org/x/sys/unix"
)

func newTestApplier(t *testing.T) (*Applier, string, string) {
	t.Helper()
	top := t.TempDir()
	root := filepath.Join(top, "replica")
	outside := filepath.Join(top, "outside")
	os.Mkdir(root, 0o755)
	os.Mkdir(outside, 0o755)
	os.WriteFile(filepath.Join(outside, "secret"), []byte("keep"), 0o644)
	// A symlink inside the replica that points out of it.
	os.Symlink(outside, filepath.Join(root, "escape"))
	os.Symlink("../outside", filepath.Join(root, "rel-escape"))
	a, err := NewApplier(root)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { a.Close() })
	return a, root, outside
}

// Nothing outside the replica root may be touched, whatever the ops say.
func TestApplierConfinement(t *testing.T) {
	a, _, outside := newTestApplier(t)
	hostile := []wire.Op{
		{Code: wire.OpWrite, Path: "escape/secret", Data: []byte("pwned")},
		{Code: wire.OpTruncate, Path: "rel-escape/secret"},
		{Code: wire.OpCreate, Path: "escape/new", Mode: 0o644},
		{Code: wire.OpMkdir, Path: "escape/dir", Mode: 0o755},
		{Code: wire.OpRemove, Path: "escape/secret"},
		{Code: wire.OpRename, Path: "escape/secret", Path2: "stolen"},
		{Code: wire.OpLink, Path: "escape/secret", Path2: "hardlinked"},
		{Code: wire.OpSetattr, Path: "escape/secret", Mode: 0o777},
		{Code: wire.OpSymlink, Path: "escape/l", Path2: "x"},
		{Code: wire.OpWrite, Path: "../outside/secret", Data: []byte("pwned")},
		{Code: wire.OpWrite, Path: "/etc/passwd", Data: []byte("pwned")},
		{Code: wire.OpMknod, Path: "dev", Mode: unix.S_IFCHR | 0o600},
	}
	for _, op := range hostile {
		if err := a.Apply(&op); err == nil {
			t.Errorf("%s %q → %q was applied", op.Code, op.Path, op.Path2)
		}
	}
	b, err := os.ReadFile(filepath.Join(outside, "secret"))
	if err != nil || string(b) != "keep" {
		t.Fatalf("file outside the replica changed: %q, %v", b, err)
	}
	ents, _ := os.ReadDir(outside)
	if len(ents) != 1 {
		t.Fatalf("outside directory has %d entries, want 1", len(ents))
	}
}

// Replaying ops after a restart must leave the same result.
func TestApplierIdempotentReplay(t *testing.T) {
	a, root, _ := newTestApplier(t)
	ops := []wire.Op{
		{Code: wire.OpMkdir, Path: "d", Mode: 0o750},
		{Code: wire.OpCreate, Path: "d/f", Mode: 0o640},
		{Code: wire.OpWrite, Path: "d/f", Off: 3, Data: []byte("abc")},
		{Code: wire.OpLink, Path: "d/f", Path2: "g"},
		{Code: wire.OpRename, Path: "d/f", Path2: "d/h"},
		{Code: wire.OpSymlink, Path: "s", Path2: "d/h"},
		{Code: wire.OpRemove, Path: "escape"},
	}
	for round := 0; round < 2; round++ {
		for i := range ops {
			if err := a.Apply(&ops[i]); err != nil {
				t.Fatalf("round %d: %v", round, err)
			}
		}
	}
	b, err := os.ReadFile(filepath.Join(root, "d/h"))
	if err != nil || string(b) != "\x00\x00\x00abc" {
		t.Fatalf("d/h = %q, %v", b, err)
	}
	var s1, s2 unix.Stat_t
	unix.Stat(filepath.Join(root, "g"), &s1)
	unix.Stat(filepath.Join(root, "d/h"), &s2)
	if s1.Ino != s2.Ino {
		t.Fatal("g and d/h are no longer the same file")
	}
	if _, err := os.Lstat(filepath.Join(root, "d/f")); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("d/f still exists after the replayed rename: %v", err)
	}
	if st, _ := os.Stat(filepath.Join(root, "d")); st.Mode().Perm() != 0o750 {
		t.Fatalf("d mode %v", st.Mode())
	}
}

// Create replaces what is there without truncating an inode that has
// other names.
func TestApplierCreateKeepsOtherLinks(t *testing.T) {
	a, root, _ := newTestApplier(t)
	os.WriteFile(filepath.Join(root, "a"), []byte("other name"), 0o644)
	os.Link(filepath.Join(root, "a"), filepath.Join(root, "b"))
	if err := a.Apply(&wire.Op{Code: wire.OpCreate, Path: "b", Mode: 0o600}); err != nil {
		t.Fatal(err)
	}
	if b, _ := os.ReadFile(filepath.Join(root, "a")); string(b) != "other name" {
		t.Fatalf("a = %q: create truncated a shared inode", b)
	}
}

// Create makes a new inode whatever holds the name (nothing, a file with
// other names, a directory with entries, a symlink out of the replica,
// a FIFO), and what follows it in the batch (size, data, mode, times)
// lands on that inode, not on what the name held, nor outside.
func TestApplierCreateOverEveryKind(t *testing.T) {
	a, root, outside := newTestApplier(t)
	os.WriteFile(filepath.Join(root, "file"), []byte("other name"), 0o644)
	os.Link(filepath.Join(root, "file"), filepath.Join(root, "link"))
	os.MkdirAll(filepath.Join(root, "dir/sub"), 0o755)
	os.WriteFile(filepath.Join(root, "dir/sub/x"), []byte("x"), 0o644)
	unix.Mkfifo(filepath.Join(root, "fifo"), 0o644)
	mtime := time.Unix(1700000000, 0)
	for _, name := range []string{"free", "link", "dir", "escape", "rel-escape", "fifo"} {
		ops := []wire.Op{
			{Code: wire.OpCreate, Path: name, Mode: 0o640},
			{Code: wire.OpTruncate, Path: name, Off: 5},
			{Code: wire.OpWrite, Path: name, Off: 0, Data: []byte("new " + name)},
			{Code: wire.OpSetattr, Path: name, Mode: 0o604, UID: uint32(os.Getuid()), GID: uint32(os.Getgid()), Mtime: mtime.UnixNano(), Atime: mtime.UnixNano()},
		}
		for i := range ops {
			if err := a.Apply(&ops[i]); err != nil {
				t.Fatalf("%s: %v", name, err)
			}
		}
		st, err := os.Lstat(filepath.Join(root, name))
		if err != nil || !st.Mode().IsRegular() || st.Mode().Perm() != 0o604 || !st.ModTime().Equal(mtime) {
			t.Fatalf("%s after create, write, setattr: %v (%v)", name, st, err)
		}
		if b, _ := os.ReadFile(filepath.Join(root, name)); string(b) != "new "+name {
			t.Fatalf("%s = %q", name, b)
		}
	}
	if b, _ := os.ReadFile(filepath.Join(root, "file")); string(b) != "other name" {
		t.Fatalf("file = %q: the create of its other name reached it", b)
	}
	if b, _ := os.ReadFile(filepath.Join(outside, "secret")); string(b) != "keep" {
		t.Fatalf("outside/secret = %q", b)
	}
}

// Sync flushes a batch's entries, including a FIFO, without blocking.
func TestApplierTargetedSync(t *testing.T) {
	a, root, _ := newTestApplier(t)
	ops := []wire.Op{
		{Code: wire.OpCreate, Path: "f", Mode: 0o644},
		{Code: wire.OpWrite, Path: "f", Data: []byte("x")},
		{Code: wire.OpMknod, Path: "fifo", Mode: unix.S_IFIFO | 0o600},
		{Code: wire.OpSetattr, Path: "fifo", Mode: 0o640},
		{Code: wire.OpSetattr, Path: "escape", Mode: 0o777},
	}
	for i := range ops {
		if err := a.Apply(&ops[i]); err != nil {
			t.Fatal(err)
		}
	}
	done := make(chan error, 1)
	go func() { done <- a.Sync() }()
	select {
	case err := <-done:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Sync blocked (a FIFO opened for writing?)")
	}
	if b, _ := os.ReadFile(filepath.Join(root, "f")); string(b) != "x" {
		t.Fatalf("f = %q", b)
	}
}

// syncfsCounter replaces an applier's syncfs: it counts the calls and
// fails while fail is set.
type syncfsCounter struct {
	calls int
	fail  error
}

func (c *syncfsCounter) syncfs(fd int) error {
	c.calls++
	if c.fail != nil {
		return c.fail
	}
	return unix.Syncfs(fd)
}

// A new applier does not know what an earlier one (an earlier connection,
// an earlier daemon run) left unflushed: its first Sync is a syncfs, even
// with nothing applied since.
func TestApplierFirstSyncFlushesAll(t *testing.T) {
	a, _, _ := newTestApplier(t)
	c := &syncfsCounter{}
	a.syncfs = c.syncfs
	if err := a.Sync(); err != nil {
		t.Fatal(err)
	}
	if c.calls != 1 {
		t.Fatalf("first Sync of a new applier ran %d syncfs, want 1: earlier writes would be acknowledged durable unflushed", c.calls)
	}
	if err := a.Sync(); err != nil || c.calls != 1 {
		t.Fatalf("second Sync with nothing applied: %d syncfs (%v), want none", c.calls-1, err)
	}
}

// A failed Sync owes what it did not flush: the next one flushes it
// instead of reporting success for nothing.
func TestApplierFailedSyncIsRetried(t *testing.T) {
	a, _, _ := newTestApplier(t)
	c := &syncfsCounter{}
	a.syncfs = c.syncfs
	for i := 0; i <= maxTargeted; i++ { // past the targeted flush: a syncfs
		name := fmt.Sprintf("f%d", i)
		for _, op := range []wire.Op{{Code: wire.OpCreate, Path: name, Mode: 0o644}, {Code: wire.OpWrite, Path: name, Data: []byte("x")}} {
			if err := a.Apply(&op); err != nil {
				t.Fatal(err)
			}
		}
	}
	c.fail = unix.EIO
	if err := a.Sync(); !errors.Is(err, unix.EIO) {
		t.Fatalf("Sync with a failing syncfs: %v, want EIO", err)
	}
	c.fail, c.calls = nil, 0
	if err := a.Sync(); err != nil {
		t.Fatal(err)
	}
	if c.calls != 1 {
		t.Fatalf("Sync after a failed one ran %d syncfs, want 1: the unflushed batch would be acknowledged durable", c.calls)
	}
}

// A Unix socket in a replicated directory (MariaDB's mysql.sock in its
// datadir) has nothing to flush: its directory is flushed. Opening it
// fails (ENXIO), which must not fail the sync.
func TestApplierSyncSkipsSocket(t *testing.T) {
	a, root, _ := newTestApplier(t)
	if err := a.Sync(); err != nil { // a new applier's first one is a syncfs
		t.Fatal(err)
	}
	ln, err := net.Listen("unix", filepath.Join(root, "mysql.sock"))
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	op := wire.Op{Code: wire.OpSetattr, Path: "mysql.sock", Mode: 0o777}
	if err := a.Apply(&op); err != nil {
		t.Fatal(err)
	}
	if err := a.Sync(); err != nil {
		t.Fatalf("sync of a batch that touched a socket: %v", err)
	}
}

// Where the replica holds something else than a regular file (its copy
// differs), a write is refused at once with what is there: opening a
// FIFO for writing would block the applier for good.
func TestApplierWriteRefusesNonRegular(t *testing.T) {
	a, root, _ := newTestApplier(t)
	fifo := filepath.Join(root, "fifo")
	if err := unix.Mkfifo(fifo, 0o644); err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("unix", filepath.Join(root, "sock"))
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	for _, c := range []struct{ path, kind string }{{"fifo", "a fifo"}, {"sock", "a socket"}} {
		done := make(chan error, 1)
		go func() { done <- a.Apply(&wire.Op{Code: wire.OpWrite, Path: c.path, Data: []byte("x")}) }()
		select {
		case err := <-done:
			want := fmt.Sprintf("write %q: not a regular file on this replica: %s", c.path, c.kind)
			if err == nil || err.Error() != want {
				t.Errorf("write to %s: %v, want %q", c.kind, err, want)
			}
		case <-time.After(time.Second):
			// Let the blocked open finish before the test ends.
			if r, err := os.OpenFile(fifo, os.O_RDONLY|unix.O_NONBLOCK, 0); err == nil {
				defer r.Close()
			}
			<-done
			t.Fatalf("write to %s blocked the applier", c.kind)
		}
	}
}

// Ops on paths longer than PATH_MAX apply (the kernel takes such a path in
// no single lookup) and their targeted flush works.
func TestApplierPathsPastPathMax(t *testing.T) {
	a, root, _ := newTestApplier(t)
	if err := a.Sync(); err != nil { // a new applier's first one is a syncfs
		t.Fatal(err)
	}
	var ops []wire.Op
	dir := ""
	for i := 0; len(dir) <= unix.PathMax; i++ {
		dir = path.Join(dir, strings.Repeat(string(rune('a'+i%26)), 255))
		ops = append(ops, wire.Op{Code: wire.OpMkdir, Path: dir, Mode: 0o755})
	}
	f := dir + "/f"
	ops = append(ops,
		wire.Op{Code: wire.OpCreate, Path: dir + "/tmp", Mode: 0o600},
		wire.Op{Code: wire.OpWrite, Path: dir + "/tmp", Data: []byte("deep")},
		wire.Op{Code: wire.OpRename, Path: dir + "/tmp", Path2: f},
		wire.Op{Code: wire.OpLink, Path: f, Path2: dir + "/g"},
		wire.Op{Code: wire.OpSetattr, Path: f, Mode: 0o640},
		wire.Op{Code: wire.OpSymlink, Path: dir + "/s", Path2: "f"},
		wire.Op{Code: wire.OpMknod, Path: dir + "/p", Mode: unix.S_IFIFO | 0o600},
		wire.Op{Code: wire.OpRemove, Path: dir + "/p"},
	)
	for i := range ops {
		if err := a.Apply(&ops[i]); err != nil {
			t.Fatalf("op %d (%s, a %d-byte path): %v", i, ops[i].Code, len(ops[i].Path), err)
		}
	}
	if err := a.Sync(); err != nil {
		t.Fatal(err)
	}
	// A batch small enough for a targeted flush of long paths.
	a.syncfs = func(int) error { t.Fatal("syncfs, want a targeted flush"); return nil }
	write := wire.Op{Code: wire.OpWrite, Path: f, Off: 4, Data: []byte("er")}
	if err := a.Apply(&write); err != nil {
		t.Fatal(err)
	}
	if err := a.Sync(); err != nil {
		t.Fatalf("targeted flush of a %d-byte path: %v", len(f), err)
	}
	r, err := fstree.OpenRoot(root)
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	entries, _, err := fstree.Scan(r, true)
	if err != nil {
		t.Fatal(err)
	}
	got := map[string]wire.Entry{}
	for _, e := range entries {
		got[e.Path] = e
	}
	if e := got[f]; !e.Mode.IsRegular() || e.Mode.Perm() != 0o640 || e.Size != 6 || e.Sums[0] != fstree.SumBlock([]byte("deeper")) {
		t.Fatalf("%d-byte path: %v size %d, want the 6-byte file \"deeper\", mode 0640", len(f), e.Mode, e.Size)
	}
	if e := got[dir+"/g"]; e.Ino != got[f].Ino {
		t.Fatal("the hard link is not the same file")
	}
	if e := got[dir+"/s"]; e.Target != "f" {
		t.Fatalf("symlink target %q", e.Target)
	}
	if _, ok := got[dir+"/p"]; ok {
		t.Fatal("removed FIFO still there")
	}
}

// TestApplierFlushCoversModes: what Sync flushes covers every mode and
// owner the batch set, fdatasync being no flush of them. A new file or
// directory gets its mode after it is made (the daemon's umask would
// strip group write, set-user-ID...), not in the setattr that follows
// with the times: it needs fsync all the same. A FIFO or socket cannot be
// opened, and its directory's fsync does not cover its inode on XFS: a
// setattr on it makes the Sync a syncfs (as a symlink's does).
func TestApplierFlushCoversModes(t *testing.T) {
	a, root, _ := newTestApplier(t)
	os.Mkdir(filepath.Join(root, "sub"), 0o755)
	if err := unix.Mkfifo(filepath.Join(root, "sub", "fifo"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := a.Sync(); err != nil { // a new applier's first one is a syncfs
		t.Fatal(err)
	}
	times := func(p string, mode uint32) wire.Op {
		return wire.Op{Code: wire.OpSetattr, Path: p, Mode: mode, Mtime: 1e18, Atime: 1e18}
	}
	ops := []wire.Op{
		{Code: wire.OpCreate, Path: "f", Mode: 0o4775},
		{Code: wire.OpWrite, Path: "f", Data: []byte("x")},
		times("f", 0o4775),
		{Code: wire.OpMkdir, Path: "d", Mode: 0o2775},
		times("d", 0o2775),
	}
	for i := range ops {
		if err := a.Apply(&ops[i]); err != nil {
			t.Fatal(err)
		}
	}
	if a.overflow {
		t.Fatal("a syncfs planned: the targeted flush is not tested")
	}
	for _, p := range []string{"f", "d"} {
		if !a.dirty[p] {
			t.Errorf("%s, made with a mode umask strips, then given times: flushed with fdatasync, its mode not made durable", p)
		}
	}
	fifo := times("sub/fifo", 0o640)
	if err := a.Apply(&fifo); err != nil {
		t.Fatal(err)
	}
	if !a.overflow {
		t.Error("a FIFO's new mode: no syncfs planned, and the FIFO cannot be flushed: the mode is not made durable")
	}
}

// TestReplayFromSavedOp: a replica killed at any point of a batch (after
// an op, before or after a save of its progress) resumes from the progress
// it saved (opProgress) and, the primary sending the batch again, applies
// the ops after that point a second time: the tree must end as if each op
// ran once, and no op may fail.
func TestReplayFromSavedOp(t *testing.T) {
	t1, t2 := time.Unix(1700000000, 0).UnixNano(), time.Unix(1700000500, 0).UnixNano()
	uid, gid := uint32(os.Getuid()), uint32(os.Getgid())
	cases := []struct {
		name       string
		setup, ops []wire.Op
	}{
		{name: "mixed", ops: []wire.Op{
			{Code: wire.OpMkdir, Path: "d", Mode: 0o755},
			{Code: wire.OpCreate, Path: "d/a", Mode: 0o644},
			{Code: wire.OpWrite, Path: "d/a", Off: 0, Data: []byte("the old contents of a")},
			{Code: wire.OpSetattr, Path: "d/a", Mode: 0o600, UID: uid, GID: gid, Mtime: t1, Atime: t1},
			{Code: wire.OpRename, Path: "d/a", Path2: "d/b"},
			{Code: wire.OpCreate, Path: "d/a", Mode: 0o644},
			{Code: wire.OpTruncate, Path: "d/a", Off: 20},
			{Code: wire.OpWrite, Path: "d/a", Off: 0, Data: []byte("new data")},
			{Code: wire.OpPunch, Path: "d/a", Off: 2, Len: 3},
			{Code: wire.OpSetattr, Path: "d/a", Mode: 0o640, UID: uid, GID: gid, Mtime: t2, Atime: t2},
			{Code: wire.OpWrite, Path: "d/a", Off: 18, Data: []byte("zz")},
			{Code: wire.OpLink, Path: "d/b", Path2: "c"},
			{Code: wire.OpTruncate, Path: "c", Off: 7},
			{Code: wire.OpSetattr, Path: "c", Mode: 0o604, UID: uid, GID: gid, Mtime: t1, Atime: t1},
			{Code: wire.OpTruncate, Path: "d/a", Off: 19},
		}},
		// The review's: a's size and attributes set, then b renamed over
		// it; replayed from before the truncate once the rename is done,
		// the truncate would cut the renamed file.
		{name: "rename over a truncated file", setup: []wire.Op{
			{Code: wire.OpCreate, Path: "a", Mode: 0o644},
			{Code: wire.OpWrite, Path: "a", Data: []byte("the old contents of a")},
			{Code: wire.OpCreate, Path: "b", Mode: 0o600},
			{Code: wire.OpWrite, Path: "b", Data: []byte("the new contents, private")},
		}, ops: []wire.Op{
			{Code: wire.OpSetattr, Path: "a", Mode: 0o644, UID: uid, GID: gid, Mtime: t1, Atime: t1},
			{Code: wire.OpTruncate, Path: "a", Off: 3},
			{Code: wire.OpRename, Path: "b", Path2: "a"},
		}},
		// Replayed from before the write once tmp is renamed, the write
		// finds no tmp: the batch would fail for good.
		{name: "write then rename away", setup: []wire.Op{
			{Code: wire.OpCreate, Path: "tmp", Mode: 0o644},
		}, ops: []wire.Op{
			{Code: wire.OpWrite, Path: "tmp", Data: []byte("payload")},
			{Code: wire.OpSetattr, Path: "tmp", Mode: 0o640, UID: uid, GID: gid, Mtime: t1, Atime: t1},
			{Code: wire.OpRename, Path: "tmp", Path2: "a"},
			{Code: wire.OpWrite, Path: "a", Off: 7, Data: []byte("!")},
		}},
	}
	// Review of 42342c6: namespace ops replayed alone, and first in the
	// batch (no name c or d/b: state reads the mtimes of those).
	cases = append(cases, []struct {
		name       string
		setup, ops []wire.Op
	}{
		{name: "hard links renamed and replaced", ops: []wire.Op{
			{Code: wire.OpCreate, Path: "a", Mode: 0o644},
			{Code: wire.OpWrite, Path: "a", Data: []byte("one inode")},
			{Code: wire.OpLink, Path: "a", Path2: "b"},
			{Code: wire.OpRename, Path: "a", Path2: "b"}, // both names of one inode
			{Code: wire.OpLink, Path: "b", Path2: "e"},
			{Code: wire.OpCreate, Path: "b", Mode: 0o600}, // b had another name
			{Code: wire.OpWrite, Path: "b", Data: []byte("new b")},
			{Code: wire.OpLink, Path: "b", Path2: "e"}, // over an existing e
			{Code: wire.OpWrite, Path: "e", Off: 5, Data: []byte("!")},
		}},
		{name: "directories", setup: []wire.Op{
			{Code: wire.OpCreate, Path: "x", Mode: 0o644},
			{Code: wire.OpWrite, Path: "x", Data: []byte("file x")},
		}, ops: []wire.Op{
			{Code: wire.OpMkdir, Path: "x", Mode: 0o750}, // over a file
			{Code: wire.OpCreate, Path: "x/f", Mode: 0o644},
			{Code: wire.OpWrite, Path: "x/f", Data: []byte("in x")},
			{Code: wire.OpMkdir, Path: "y", Mode: 0o755},
			{Code: wire.OpCreate, Path: "y/g", Mode: 0o644},
			{Code: wire.OpRename, Path: "x", Path2: "y"}, // over a non-empty directory
			{Code: wire.OpWrite, Path: "y/f", Off: 4, Data: []byte("!")},
			{Code: wire.OpRemove, Path: "y"},
			{Code: wire.OpSymlink, Path: "y", Path2: "target"},
			{Code: wire.OpMknod, Path: "fifo", Mode: unix.S_IFIFO | 0o644},
			{Code: wire.OpRename, Path: "fifo", Path2: "y"},
		}},
		{name: "moved aside then recreated", setup: []wire.Op{
			{Code: wire.OpMkdir, Path: "w", Mode: 0o755},
			{Code: wire.OpCreate, Path: "w/f", Mode: 0o644},
			{Code: wire.OpWrite, Path: "w/f", Data: []byte("old f")},
			{Code: wire.OpCreate, Path: "x", Mode: 0o644},
			{Code: wire.OpWrite, Path: "x", Data: []byte("old x")},
		}, ops: []wire.Op{
			{Code: wire.OpRename, Path: "w", Path2: "w.old"}, // first op: no save before
			{Code: wire.OpMkdir, Path: "w", Mode: 0o700},
			{Code: wire.OpWrite, Path: "w.old/f", Off: 4, Data: []byte("tail")},
			{Code: wire.OpRename, Path: "x", Path2: ".duet-replaced-9"},
			{Code: wire.OpCreate, Path: "x", Mode: 0o600},
			{Code: wire.OpWrite, Path: "x", Data: []byte("new x")},
			{Code: wire.OpRename, Path: ".duet-replaced-9", Path2: "w/x"},
			{Code: wire.OpTruncate, Path: "w/x", Off: 1},
			{Code: wire.OpRename, Path: "x", Path2: "w.old/f"},
			{Code: wire.OpRemove, Path: "w.old"},
		}},
	}...)
	times := map[int64]bool{t1: true, t2: true} // the mtimes setattrs set
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			once := t.TempDir()
			if err := applyOps(once, tc.setup); err != nil {
				t.Fatal(err)
			}
			if err := applyOps(once, tc.ops); err != nil {
				t.Fatal(err)
			}
			want := replayTree(t, once, times)
			// Every point the daemon may die at: how many ops were
			// applied, and the progress saved by then.
			type point struct{ applied, saved int }
			points := []point{{0, 0}}
			var prog opProgress
			saved := 0
			for i := range tc.ops {
				if prog.before(tc.ops[i].Code) {
					saved = i
					points = append(points, point{i, saved})
				}
				points = append(points, point{i + 1, saved})
				if prog.after(tc.ops[i].Code) {
					saved = i + 1
					points = append(points, point{i + 1, saved})
				}
			}
			for _, pt := range points {
				root := t.TempDir()
				if err := applyOps(root, tc.setup); err != nil {
					t.Fatal(err)
				}
				if err := applyOps(root, tc.ops[:pt.applied]); err != nil {
					t.Fatal(err)
				}
				if err := applyOps(root, tc.ops[pt.saved:]); err != nil {
					t.Errorf("killed with %d ops applied, replayed from op %d: %v", pt.applied, pt.saved, err)
					continue
				}
				if got := replayTree(t, root, times); got != want {
					t.Errorf("killed with %d ops applied, replayed from op %d:\n%s\nwant\n%s", pt.applied, pt.saved, got, want)
				}
			}
		})
	}
}

// applyOps applies ops to root with a new applier, as a replica whose
// daemon starts afresh would.
func applyOps(root string, ops []wire.Op) error {
	a, err := NewApplier(root)
	if err != nil {
		return err
	}
	defer a.Close()
	for i := range ops {
		if err := a.Apply(&ops[i]); err != nil {
			return fmt.Errorf("op %d (%s %s): %w", i, ops[i].Code, ops[i].Path, err)
		}
	}
	return nil
}
